//! Every scalar setting, declared once: file key (the field name), `EDGEPROXY_*` variable
//! (edgeProxy's names), flag (`--` and the key in kebab case unless given), default, check
//! and one line of help (the doc comment). The [`settings!`](super::layer) macro turns this
//! list into [`Settings`], the flags, the environment reader, `config show` and the
//! README's configuration table, so a new setting is one entry here plus the code that
//! uses it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::layer::{LogFormat, Seconds, at_most, not_blank, positive};

// Upper bounds keep every `Instant + Duration` on the hot path far from overflow.
const DAY: u64 = 86_400;
const YEAR: u64 = 365 * DAY;

crate::settings! {
    /// the listener when no `[[listener]]` is given; serves every app
    listen_addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8080)), env "EDGEPROXY_LISTEN_ADDR";
    /// routing table (created with the schema if missing)
    db_path: PathBuf = PathBuf::from("routing.db"), env "EDGEPROXY_DB_PATH";
    /// the routing table in PostgreSQL instead of the file: `postgres://user@host:port/db`
    /// (or `key=value` pairs); unset: the SQLite file at `db_path`
    db_url: Option<String> = None, env "EDGEPROXY_DB_URL", secret true;
    /// CA certificate (PEM) the PostgreSQL server's certificate must chain to; set: TLS
    db_ca_file: Option<PathBuf> = None, env "EDGEPROXY_DB_CA_FILE";
    /// file holding the PostgreSQL password (kept out of `db_url`)
    db_password_file: Option<PathBuf> = None, env "EDGEPROXY_DB_PASSWORD_FILE";
    /// this POP's region
    region: String = "sa".to_owned(), env "EDGEPROXY_REGION", check |v| not_blank(v);
    /// reload period; file changes also reload at once
    db_reload_secs: u64 = 5, env "EDGEPROXY_DB_RELOAD_SECS", check |v| positive(v).and(at_most(v, DAY));
    /// MaxMind-format database (GeoIP2/GeoLite2 Country or City, or ip-location-db
    /// country); unset: the embedded one
    geoip_path: Option<PathBuf> = None, env "EDGEPROXY_GEOIP_PATH";
    /// binding lifetime after last use; `0` turns bindings off
    binding_ttl_secs: u64 = 600, env "EDGEPROXY_BINDING_TTL_SECS", check |v| at_most(v, YEAR);
    /// bindings held at most; past it the least recently used are evicted (counted); `0`:
    /// no cap
    max_bindings: usize = 1_000_000, env "EDGEPROXY_MAX_BINDINGS", check |v| at_most(v, 100_000_000);
    /// how often expired bindings are swept
    binding_gc_interval_secs: u64 = 60, env "EDGEPROXY_BINDING_GC_INTERVAL_SECS", check |v| positive(v).and(at_most(v, DAY));
    /// per backend connect attempt
    connect_timeout_ms: u64 = 3000, env "EDGEPROXY_CONNECT_TIMEOUT_MS", check |v| positive(v).and(at_most(v, 600_000));
    /// backends tried per connection
    connect_attempts: u32 = 3, env "EDGEPROXY_CONNECT_ATTEMPTS", check |v| positive(v).and(at_most(v, 100));
    /// close a connection (with a reset) when neither side sent anything for this long, as
    /// nginx's `proxy_timeout`; `0`: never
    idle_timeout_secs: u64 = 600, env "EDGEPROXY_IDLE_TIMEOUT_SECS", check |v| at_most(v, YEAR);
    /// a routing reload that removes more than this percentage of the backends at once is
    /// logged as an error and counted (it still applies: draining everything is allowed)
    reload_drop_warn_percent: u64 = 50, env "EDGEPROXY_RELOAD_DROP_WARN_PERCENT", check |v| at_most(v, 100);
    /// TCP keepalive on client and backend sockets: idle seconds before the first probe
    /// (then every 10 s, the system's count); `0` turns it off
    tcp_keepalive_secs: u64 = 60, env "EDGEPROXY_TCP_KEEPALIVE_SECS", check |v| at_most(v, 32767);
    /// client connections open at once in this POP; at the cap accepting pauses (clients
    /// wait in the kernel's backlog) until one closes; `0`: no cap
    max_connections: usize = 50_000, env "EDGEPROXY_MAX_CONNECTIONS", check |v| at_most(v, 10_000_000);
    /// on SIGTERM/SIGINT, how long open connections may finish
    drain_timeout_secs: u64 = 30, env "EDGEPROXY_DRAIN_TIMEOUT_SECS", check |v| at_most(v, DAY);
    /// Unix socket through which a new edgeproxy (an upgrade, or new settings) takes the
    /// listening sockets over from this one without refusing a connection; `SIGHUP` starts
    /// one (docs/OPERATING.md, "Upgrades"); unset: no handover
    handover_socket: Option<PathBuf> = None, env "EDGEPROXY_HANDOVER_SOCKET";
    /// `human` or `json` (to stderr)
    log_format: LogFormat = LogFormat::Human, env "EDGEPROXY_LOG_FORMAT";
    /// verbose logs (`RUST_LOG` overrides the filter); edgeProxy's `DEBUG` is on when set
    /// to anything but `0` or `false`
    debug: bool = false, env "DEBUG";
    /// region of countries no region lists
    default_region: String = "us".to_owned(), env "EDGEPROXY_DEFAULT_REGION", check |v| not_blank(v);
    /// policy component (`.wasm`), watched and swapped in live; unset: the embedded geo-load
    policy_path: Option<PathBuf> = None, env "EDGEPROXY_POLICY_PATH", flag "policy";
    /// a second policy component that decides beside the live one on real traffic, only
    /// for the record (`GET /policy/shadow`); watched and swapped in live like the policy
    shadow_policy_path: Option<PathBuf> = None, env "EDGEPROXY_SHADOW_POLICY_PATH", flag "shadow-policy";
    /// share of new decisions the shadow policy also makes
    shadow_sample_percent: u32 = 100, env "EDGEPROXY_SHADOW_SAMPLE_PERCENT", check |v| positive(v).and(at_most(v, 100));
    /// recent policy decisions kept for `GET /decisions` and `policy replay` (a ring);
    /// `0` keeps none
    decision_log_size: usize = 1000, env "EDGEPROXY_DECISION_LOG_SIZE", check |v| at_most(v, 1_000_000);
    /// bytes the recent decisions may take; past it the oldest go (a record keeps at most
    /// 256 candidates)
    decision_log_max_bytes: usize = 16 << 20, env "EDGEPROXY_DECISION_LOG_MAX_BYTES", check |v| positive(v).and(at_most(v, 1 << 32));
    /// share of decisions recorded in it
    decision_log_sample_percent: u32 = 1, env "EDGEPROXY_DECISION_LOG_SAMPLE_PERCENT", check |v| positive(v).and(at_most(v, 100));
    /// record client addresses truncated to their /24 (IPv4) or /48 (IPv6; 6to4 at the
    /// embedded IPv4's /24), in the decision log and in log lines
    decision_log_truncate_clients: bool = true, env "EDGEPROXY_DECISION_LOG_TRUNCATE_CLIENTS";
    /// decide with the host's native scorer (no WebAssembly)
    native_policy: bool = false, env "EDGEPROXY_NATIVE_POLICY";
    /// budget of one policy call (10^6 wasm instructions per ms), at most 1000
    policy_timeout_ms: u64 = 1, env "EDGEPROXY_POLICY_TIMEOUT_MS", check |v| positive(v).and(at_most(v, 1000));
    /// memory of one policy instance, at most 4096
    policy_memory_mib: u64 = 32, env "EDGEPROXY_POLICY_MEMORY_MIB", check |v| positive(v).and(at_most(v, 4096));
    /// largest policy component a fleet deployment may carry (`policy deploy`), at most 1024
    policy_max_mib: u64 = 64, env "EDGEPROXY_POLICY_MAX_MIB", check |v| positive(v).and(at_most(v, 1024));
    /// compiled policies are kept here, so a restart or a reload of a known component does
    /// not compile it again (created private to the user edgeproxy runs as; one open to
    /// others is not used); empty turns it off
    policy_cache_dir: Option<PathBuf> = Some(PathBuf::from(".edgeproxy-cache")), env "EDGEPROXY_POLICY_CACHE_DIR";
    /// runtime threads, each accepting on its own `SO_REUSEPORT` socket; `0`: one per core;
    /// `1` runs a single-threaded runtime
    worker_threads: usize = 0, env "EDGEPROXY_WORKER_THREADS", check |v| at_most(v, 1024);
    /// how plain listeners move connections: `epoll` (tokio's readiness) or `io_uring` (a
    /// ring per worker thread: multishot accept, provided buffers; Linux 5.19+, falls back
    /// to `epoll` with a warning where io_uring is missing or disabled; TLS listeners stay
    /// on `epoll`). docs/PERFORMANCE.md says when to choose which
    data_path: String = "epoll".to_owned(), env "EDGEPROXY_DATA_PATH", check |v| one_of(v, &["epoll", "io_uring"]);
    /// admin JSON API and Prometheus `/metrics`; empty turns it off
    admin_addr: Option<SocketAddr> = Some(SocketAddr::from(([127, 0, 0, 1], 9090))), env "EDGEPROXY_ADMIN_ADDR";
    /// admin and registration API connections close after this long without a byte while
    /// no request of theirs is handled, and a request body this long without a byte is
    /// refused (408)
    http_idle_timeout_secs: u64 = 30, env "EDGEPROXY_HTTP_IDLE_TIMEOUT_SECS", check |v| positive(v).and(at_most(v, 3600));
    /// when set, every admin request needs `Authorization: Bearer <token>` (prefer the
    /// variable: flags show in `ps`)
    admin_token: Option<String> = None, env "EDGEPROXY_ADMIN_TOKEN", secret true;
    /// serve a non-loopback `admin_addr` without a token (otherwise refused at start-up)
    admin_allow_remote: bool = false, env "EDGEPROXY_ADMIN_ALLOW_REMOTE";
    /// serve Prometheus metrics (on the admin listener and `metrics_listen_addr`)
    metrics_enabled: bool = true, env "EDGEPROXY_METRICS_ENABLED";
    /// also serve the metrics alone on this address (edgeProxy's metrics server), behind
    /// `admin_token`; without a token (or `admin_allow_remote`) it is served on loopback
    /// only
    metrics_listen_addr: Option<SocketAddr> = None, env "EDGEPROXY_METRICS_LISTEN_ADDR";
    /// the metrics' path, on both listeners
    metrics_path: String = "/metrics".to_owned(), env "EDGEPROXY_METRICS_PATH", check |v| metrics_path(v);
    /// join the fleet: share the routing table with the other POPs (docs/CLUSTER.md)
    cluster_enabled: bool = false, env "EDGEPROXY_REPLICATION_ENABLED";
    /// this POP's name in the cluster, the one its certificate carries; unset: the host
    /// name
    cluster_node_id: Option<String> = None, env "EDGEPROXY_REPLICATION_NODE_ID";
    /// name every POP of one fleet shares; a node with another name cannot join
    cluster_name: String = "edgeproxy".to_owned(), env "EDGEPROXY_REPLICATION_CLUSTER_NAME", check |v| not_blank(v);
    /// SWIM membership (QUIC datagrams, UDP)
    cluster_gossip_addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 4001)), env "EDGEPROXY_REPLICATION_GOSSIP_ADDR";
    /// row exchange (QUIC streams, UDP)
    cluster_transport_addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 4002)), env "EDGEPROXY_REPLICATION_TRANSPORT_ADDR";
    /// the address other POPs reach this one at (its WireGuard IP); unset: the IP the
    /// addresses above are bound to, or when that is `0.0.0.0`, the one routing to the
    /// first bootstrap peer
    cluster_advertise_ip: Option<IpAddr> = None, env "EDGEPROXY_REPLICATION_ADVERTISE_IP";
    /// gossip addresses (`host:port`, comma-separated) to join through; peers met since
    /// are remembered in the database
    cluster_bootstrap_peers: String = String::new(), env "EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS";
    /// SWIM probe period; failure detection takes about three
    cluster_gossip_interval_ms: u64 = 1000, env "EDGEPROXY_REPLICATION_GOSSIP_INTERVAL_MS", check |v| at_most(v, 60_000).and(if *v < 50 { Err("must be at least 50".into()) } else { Ok(()) });
    /// anti-entropy round with a random member (jittered ±50%)
    cluster_sync_interval_ms: u64 = 2000, env "EDGEPROXY_REPLICATION_SYNC_INTERVAL_MS", check |v| positive(v).and(at_most(v, 3_600_000));
    /// a row stamped further ahead of this POP's clock waits until it is not
    cluster_max_clock_skew_ms: u64 = 60_000, env "EDGEPROXY_REPLICATION_MAX_CLOCK_SKEW_MS", check |v| positive(v).and(at_most(v, YEAR * 1000));
    /// deleted rows (tombstones) are kept this long, then purged; a POP away longer than
    /// this resynchronises fully when it returns (docs/CLUSTER.md)
    cluster_tombstone_ttl_secs: u64 = 7 * DAY, env "EDGEPROXY_REPLICATION_TOMBSTONE_TTL_SECS", check |v| positive(v).and(at_most(v, 10 * YEAR));
    /// no authentication between POPs: any process that reaches the cluster ports and knows
    /// the cluster name can read and write the routing table. Only on a network that
    /// authenticates every peer itself (WireGuard); warned about at start
    cluster_plaintext: bool = false, env "EDGEPROXY_REPLICATION_PLAINTEXT";
    /// the cluster CA certificate (`edgeproxy cluster ca`)
    cluster_ca_file: Option<PathBuf> = None, env "EDGEPROXY_REPLICATION_CA_FILE";
    /// this POP's certificate (`edgeproxy cluster cert NODE`)
    cluster_cert_file: Option<PathBuf> = None, env "EDGEPROXY_REPLICATION_CERT_FILE";
    /// this POP's private key
    cluster_key_file: Option<PathBuf> = None, env "EDGEPROXY_REPLICATION_KEY_FILE";
    /// probe the backends this POP may route to; the verdict is this POP's own
    /// (docs/OPERATING.md, health checks)
    health_check_enabled: bool = false, env "EDGEPROXY_HEALTH_CHECK_ENABLED";
    /// time between two checks of one backend (jittered)
    health_check_interval_secs: Seconds = Seconds::secs(5), env "EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS", check |v| in_range(v, 0.05, DAY as f64);
    /// a check not done in this time failed
    health_check_timeout_secs: Seconds = Seconds::secs(2), env "EDGEPROXY_HEALTH_CHECK_TIMEOUT_SECS", check |v| in_range(v, 0.01, 600.0);
    /// `tcp` (connect, or `send` then `expect`) or `http` (`GET path`, expects a 2xx or
    /// 3xx status)
    health_check_type: String = "tcp".to_owned(), env "EDGEPROXY_HEALTH_CHECK_TYPE", check |v| one_of(v, &["tcp", "http"]);
    /// the path an `http` check asks for
    health_check_path: String = "/health".to_owned(), env "EDGEPROXY_HEALTH_CHECK_PATH", check |v| match v.starts_with('/') { true => Ok(()), false => Err("must start with /".into()) };
    /// `tcp` checks: bytes sent once connected (TOML escapes such as `\r\n` apply)
    health_check_send: String = String::new(), env "EDGEPROXY_HEALTH_CHECK_SEND";
    /// `tcp` checks: the answer must start with these bytes; empty: connecting is enough
    health_check_expect: String = String::new(), env "EDGEPROXY_HEALTH_CHECK_EXPECT";
    /// consecutive passed checks that bring a down backend up
    health_check_rise: u32 = 2, env "EDGEPROXY_HEALTH_HEALTHY_THRESHOLD", check |v| positive(v).and(at_most(v, 100));
    /// consecutive failed checks that take an up backend down
    health_check_fall: u32 = 3, env "EDGEPROXY_HEALTH_UNHEALTHY_THRESHOLD", check |v| positive(v).and(at_most(v, 100));
    /// each interval is drawn within this percentage of itself, so POPs and backends are
    /// not probed in lockstep
    health_check_jitter_percent: u32 = 10, env "EDGEPROXY_HEALTH_CHECK_JITTER_PERCENT", check |v| at_most(v, 50);
    /// when fewer than this percentage of an app's backends (and always when none) are up
    /// here, this POP sets its checks and ejections aside for the app and routes by the
    /// table alone: everything looking dead is usually this POP's own network
    health_check_panic_percent: u32 = 0, env "EDGEPROXY_HEALTH_CHECK_PANIC_PERCENT", check |v| at_most(v, 100);
    /// take a backend out of this POP's rotation after consecutive connect failures
    /// (passive ejection)
    ejection_enabled: bool = true, env "EDGEPROXY_CIRCUIT_BREAKER_ENABLED";
    /// consecutive failed connects (refused, timed out, unreachable) that eject a backend
    ejection_consecutive_failures: u32 = 5, env "EDGEPROXY_CIRCUIT_FAILURE_THRESHOLD", check |v| positive(v).and(at_most(v, 1000));
    /// the first ejection's length; each further one in a row lasts one more of these
    ejection_base_secs: Seconds = Seconds::secs(30), env "EDGEPROXY_CIRCUIT_TIMEOUT_SECS", check |v| in_range(v, 0.01, DAY as f64);
    /// longest ejection
    ejection_max_secs: Seconds = Seconds::secs(300), env "EDGEPROXY_EJECTION_MAX_SECS", check |v| in_range(v, 0.01, DAY as f64);
    /// never eject more than this percentage of an app's backends at once (one at least)
    ejection_max_percent: u32 = 50, env "EDGEPROXY_EJECTION_MAX_PERCENT", check |v| at_most(v, 100);
    /// limit each client prefix's new connections (a token bucket) and, with
    /// `rate_limit_max_open`, its open ones; refused connections are closed at once
    rate_limit_enabled: bool = false, env "EDGEPROXY_RATE_LIMIT_ENABLED";
    /// new connections a client prefix may open per window
    rate_limit_max_requests: u32 = 100, env "EDGEPROXY_RATE_LIMIT_MAX_REQUESTS", check |v| positive(v).and(at_most(v, 10_000_000));
    /// the window `rate_limit_max_requests` counts over
    rate_limit_window_secs: u64 = 1, env "EDGEPROXY_RATE_LIMIT_WINDOW_SECS", check |v| positive(v).and(at_most(v, DAY));
    /// new connections a client prefix may open at once (the bucket); `0`:
    /// `rate_limit_max_requests`
    rate_limit_burst: u32 = 0, env "EDGEPROXY_RATE_LIMIT_BURST", check |v| at_most(v, 10_000_000);
    /// connections one client prefix may hold open at once; `0`: no limit
    rate_limit_max_open: u32 = 0, env "EDGEPROXY_RATE_LIMIT_MAX_OPEN", check |v| at_most(v, 10_000_000);
    /// IPv4 clients are limited per prefix of this length
    rate_limit_ipv4_prefix: u32 = 32, env "EDGEPROXY_RATE_LIMIT_IPV4_PREFIX", check |v| at_most(v, 32);
    /// IPv6 clients are limited per prefix of this length (a host usually has a /64)
    rate_limit_ipv6_prefix: u32 = 64, env "EDGEPROXY_RATE_LIMIT_IPV6_PREFIX", check |v| at_most(v, 128);
    /// networks never limited (comma-separated CIDRs: monitoring, other POPs)
    rate_limit_exempt: String = String::new(), env "EDGEPROXY_RATE_LIMIT_EXEMPT";
    /// client prefixes tracked at most (about 100 bytes each); past it new ones are not
    /// limited (counted) until idle ones can be dropped
    rate_limit_max_tracked: usize = 100_000, env "EDGEPROXY_RATE_LIMIT_MAX_TRACKED", check |v| positive(v).and(at_most(v, 100_000_000));
    /// serve the registration API (edgeProxy's auto-discovery: backends register and send
    /// heartbeats)
    api_enabled: bool = false, env "EDGEPROXY_API_ENABLED";
    /// registration API address; without `api_token` it is served on loopback only
    api_listen_addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8081)), env "EDGEPROXY_API_LISTEN_ADDR";
    /// when set, registration requests need `Authorization: Bearer <token>`
    api_token: Option<String> = None, env "EDGEPROXY_API_TOKEN", secret true;
    /// a registered backend whose heartbeats stop for this long leaves rotation (in every
    /// POP)
    api_heartbeat_ttl_secs: u64 = 60, env "EDGEPROXY_HEARTBEAT_TTL_SECS", check |v| positive(v).and(at_most(v, DAY));
    /// networks registered backends may be in (comma-separated, like `10.0.0.0/8,
    /// fd00::/8`); empty: any but loopback, link-local, multicast and broadcast, which a
    /// listed network allows
    api_allowed_networks: String = String::new(), env "EDGEPROXY_API_ALLOWED_NETWORKS";
    /// ports registered backends may listen on (comma-separated, ranges as `8000-8999`);
    /// empty: any
    api_allowed_ports: String = String::new(), env "EDGEPROXY_API_ALLOWED_PORTS";
    /// backends registered through this POP at most; past it a new one gets 429
    api_max_registrations: usize = 10_000, env "EDGEPROXY_API_MAX_REGISTRATIONS", check |v| positive(v).and(at_most(v, 1_000_000));
    /// backends of one app registered through this POP at most
    api_max_per_app: usize = 1_000, env "EDGEPROXY_API_MAX_PER_APP", check |v| positive(v).and(at_most(v, 1_000_000));
    /// a registration silent for this many heartbeat TTLs is removed (deleted in every
    /// POP); `0`: kept, out of rotation, until deregistered
    api_remove_after_ttls: u32 = 10, env "EDGEPROXY_API_REMOVE_AFTER_TTLS", check |v| at_most(v, 10_000);
    /// also listen at `tls_listen_addr` and terminate TLS there (edgeProxy's TLS
    /// listener); any `[[listener]]` may terminate with `tls = "terminate"`
    tls_enabled: bool = false, env "EDGEPROXY_TLS_ENABLED";
    /// the terminating listener `tls_enabled` adds; serves every app
    tls_listen_addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8443)), env "EDGEPROXY_TLS_LISTEN_ADDR";
    /// certificate chain (PEM) for names no pair in `tls_cert_dir` covers; re-read when
    /// it changes
    tls_cert: Option<PathBuf> = None, env "EDGEPROXY_TLS_CERT";
    /// private key (PEM) of `tls_cert`
    tls_key: Option<PathBuf> = None, env "EDGEPROXY_TLS_KEY";
    /// directory of `NAME.pem` + `NAME.key` pairs, each serving the DNS names its
    /// certificate lists; re-read when it changes
    tls_cert_dir: Option<PathBuf> = None, env "EDGEPROXY_TLS_CERT_DIR";
    /// serve the internal DNS (edgeProxy's): `<app>.<domain>` answers the live policy's pick
    /// for the asking client, `<region>.backends`, `<region>.pops`, `_<app>._tcp` (SRV)
    dns_enabled: bool = false, env "EDGEPROXY_DNS_ENABLED";
    /// UDP and TCP address of the DNS server
    dns_listen_addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 5353)), env "EDGEPROXY_DNS_LISTEN_ADDR";
    /// the domain answered, authoritatively; names outside it are refused
    dns_domain: String = "internal".to_owned(), env "EDGEPROXY_DNS_DOMAIN", check |v| crate::domain::dns::normalise(v).map(|_| ());
    /// TTL of every answer (and of negative ones): short, so a backend drained or down
    /// leaves resolvers' caches within seconds and load moves with the policy
    dns_ttl_secs: u32 = 10, env "EDGEPROXY_DNS_TTL_SECS", check |v| at_most(v, 3600);
    /// backends an `<app>` answer gives after the policy's pick, in failover order
    dns_alternates: u32 = 1, env "EDGEPROXY_DNS_ALTERNATES", check |v| at_most(v, 16);
    /// UDP answers per second one client prefix (/24, /56) gets; past it they are dropped,
    /// every second one sent truncated (so real clients retry over TCP); `0`: no limit
    dns_rate_limit: u32 = 200, env "EDGEPROXY_DNS_RATE_LIMIT", check |v| at_most(v, 10_000_000);
    /// the fleet's public name (delegated to the POPs' DNS listeners), answered with the
    /// live POPs nearest the client; unset: none
    dns_front_name: Option<String> = None, env "EDGEPROXY_DNS_FRONT_NAME", check |v| v.as_deref().map_or(Ok(()), |n| crate::domain::dns::normalise(n).map(|_| ()));
    /// this POP's addresses under the front name (comma-separated); empty: the cluster's
    /// advertised address
    dns_front_addrs: String = String::new(), env "EDGEPROXY_DNS_FRONT_ADDRS";
    /// POPs a front-name answer gives
    dns_front_answers: u32 = 2, env "EDGEPROXY_DNS_FRONT_ANSWERS", check |v| positive(v).and(at_most(v, 8));
}

/// A path of its own: not one of the admin API's, which it would hide.
fn metrics_path(v: &str) -> Result<(), String> {
    const ADMIN: &[&str] = &[
        "/",
        "/status",
        "/backends",
        "/bindings",
        "/decisions",
        "/reload",
        "/cluster",
    ];
    if !v.starts_with('/') || v.contains(char::is_whitespace) {
        return Err("must be a path starting with /".into());
    }
    if ADMIN.contains(&v)
        || ["/bindings/", "/policy/", "/fleet/"]
            .iter()
            .any(|p| v.starts_with(p))
    {
        return Err(format!("{v} is an admin API route"));
    }
    Ok(())
}

fn in_range(v: &Seconds, min: f64, max: f64) -> Result<(), String> {
    match (min..=max).contains(&v.0.as_secs_f64()) {
        true => Ok(()),
        false => Err(format!("must be between {min} and {max} seconds")),
    }
}

fn one_of(v: &str, allowed: &[&str]) -> Result<(), String> {
    match allowed.contains(&v) {
        true => Ok(()),
        false => Err(format!("must be one of {}", allowed.join(", "))),
    }
}
