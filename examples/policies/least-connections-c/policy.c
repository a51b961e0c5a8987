/* Weighted least connections in C, like examples/policies/least-connections (Rust):
 * the eligible candidate with the fewest open connections per unit of weight wins, ties
 * to the earlier one, geography ignored. Freestanding: no libc, no imports. */
#include "edgeproxy_policy.h"

/* What a decision needs of each backend, copied out of the table at `set-table`. */
typedef struct {
    uint32_t weight;
    uint32_t hard_limit;
    bool healthy;
} info;

#define MAX_BACKENDS 16384
static info backends[MAX_BACKENDS];
static uint32_t backend_count;

/* A bump heap for what the host hands over in each call. Nothing outlives a call (the
 * table's fields are copied out), so each export resets it on return. */
extern unsigned char __heap_base;
static uintptr_t heap_top;

static uintptr_t heap_start(void) { return (uintptr_t)&__heap_base; }

EP_EXPORT("cabi_realloc")
void *cabi_realloc(void *old, size_t old_size, size_t align, size_t new_size) {
    if (heap_top == 0) heap_top = heap_start();
    uintptr_t p = (heap_top + align - 1) & ~(uintptr_t)(align - 1);
    uintptr_t end = p + new_size;
    uintptr_t have = __builtin_wasm_memory_size(0) * 65536;
    if (end > have) {
        size_t pages = (end - have + 65535) / 65536;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) __builtin_trap();
    }
    /* Only the most recent block grows in place in a bump heap; others move. */
    if (old != 0) __builtin_memcpy((void *)p, old, old_size < new_size ? old_size : new_size);
    heap_top = end;
    return (void *)p;
}

static void heap_reset(void) { heap_top = heap_start(); }

/* set-table: func(table: routing-table), flattened into 8 parameters. */
EP_EXPORT("set-table")
void set_table(int64_t version, uint32_t pop_region, const ep_string *regions,
               uint32_t regions_len, const ep_string *apps, uint32_t apps_len,
               const ep_backend *table, uint32_t len) {
    (void)version; (void)pop_region; (void)regions; (void)regions_len; (void)apps; (void)apps_len;
    backend_count = len < MAX_BACKENDS ? len : MAX_BACKENDS;
    for (uint32_t i = 0; i < backend_count; i++) {
        backends[i].weight = table[i].weight ? table[i].weight : 1;
        backends[i].hard_limit = table[i].hard_limit;
        backends[i].healthy = table[i].healthy;
    }
    heap_reset();
}

static ep_option_u32 answer;

/* pick-backend: func(app: option<app-id>, client: client, candidates: list<u32>)
 *   -> option<u32>, flattened into 12 parameters; the option comes back in memory.
 * `candidates` holds (backend index, active connections, connect RTT in us) triples. */
EP_EXPORT("pick-backend")
ep_option_u32 *pick_backend(uint32_t app_is_some, uint32_t app, uint32_t ip_kind,
                            int64_t ip_hi, int64_t ip_lo, uint32_t country_is_some,
                            uint32_t country, uint32_t region_is_some, uint32_t region,
                            uint32_t via_proxy_protocol, const uint32_t *candidates,
                            uint32_t len) {
    (void)app_is_some; (void)app; (void)ip_kind; (void)ip_hi; (void)ip_lo;
    (void)country_is_some; (void)country; (void)region_is_some; (void)region;
    (void)via_proxy_protocol;
    answer.is_some = 0;
    uint64_t best_active = 0, best_weight = 1;
    for (uint32_t i = 0; i + 2 < len; i += 3) {
        uint32_t index = candidates[i], active = candidates[i + 1];
        if (index >= backend_count) continue;
        const info *b = &backends[index];
        if (!b->healthy || (b->hard_limit != 0 && active >= b->hard_limit)) continue;
        /* active/weight < best_active/best_weight, without division. */
        if (!answer.is_some || (uint64_t)active * best_weight < best_active * b->weight) {
            answer.is_some = 1;
            answer.value = i / 3;
            best_active = active;
            best_weight = b->weight;
        }
    }
    heap_reset();
    return &answer;
}
