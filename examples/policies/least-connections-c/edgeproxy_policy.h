/* The edgeproxy:policy@0.1.0 world (wit/policy.wit) in C, by the component model's
 * canonical ABI for wasm32: what the host passes to a core module's exports.
 *
 * A module exports `set-table`, `pick-backend`, `cabi_realloc` and its memory; edgeproxy
 * wraps it into a component with the policy world itself, so no bindings generator is
 * needed. Strings and lists arrive in memory the host got from `cabi_realloc`. */
#ifndef EDGEPROXY_POLICY_H
#define EDGEPROXY_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *ptr;
    size_t len;
} ep_string;

/* `record backend`: 36 bytes, the canonical ABI's layout matches C's on wasm32. */
typedef struct {
    ep_string id;
    uint32_t app;       /* index into the table's apps */
    uint32_t region;    /* index into the table's regions */
    uint16_t country;   /* "BR" -> 'B' << 8 | 'R' */
    uint32_t weight;    /* 0 reads as 1 */
    uint32_t soft_limit;/* 0 reads as 1 */
    uint32_t hard_limit;/* 0: unlimited */
    bool healthy;
} ep_backend;

_Static_assert(sizeof(ep_backend) == 36, "canonical ABI layout of backend");

/* `option<u32>` as returned through memory: tag byte, then the value at offset 4. */
typedef struct {
    uint8_t is_some;
    uint32_t value;
} ep_option_u32;

#define EP_EXPORT(name) __attribute__((export_name(name)))

#endif
