# Sourced by the rate benchmarks: every run starts from the same TIME_WAIT state, since
# the last run's sockets (a run leaves ~100,000 for 60 s) slow the next one's connects, by
# up to 2x here. Waits (90 s at most) until at most TIME_WAIT_MAX (1000) are left.
settle() {
  local deadline=$((SECONDS + 90))
  while [ "$(ss -Htan state time-wait | wc -l)" -gt "${TIME_WAIT_MAX:-1000}" ] && [ $SECONDS -lt $deadline ]; do
    sleep 1
  done
}
