//! Process-wide settings that the command and the benchmarks share.

/// Fixes the thread count and the allocator's behaviour before any work starts.
///
/// candle asks for its thread count on every op and, unless `RAYON_NUM_THREADS` is set,
/// answers by parsing /proc/cpuinfo each time (thousands of file reads per second while
/// decoding): the answer is fixed once here. mimalloc returns freed memory to the OS after
/// 10 ms by default, so a training step's large, short-lived buffers were faulted in afresh
/// (and zeroed by the kernel) at every step; it now keeps them for reuse. candle's worker
/// pool spins briefly instead of for a millisecond between ops (see `CANDLE_SPIN_LIMIT`).
pub fn configure() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT.to_string());
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is a plain store in mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Spins of candle's idle pool workers before they sleep. candle's default (25,000) keeps a
/// worker spinning for about a millisecond after each of its ops, on a core that the next
/// (rayon-parallel) fused op or matrix product needs: 11% of a MiniLLM iteration on two cores.
const CANDLE_SPIN_LIMIT: u32 = 200;

/// `mi_option_purge_delay` in mimalloc's option enumeration (not exported by the bindings).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
