//! Process-wide settings that the command and the benchmarks share.

/// Fixes the thread count and the allocator's behaviour before any work starts.
///
/// candle asks for its thread count on every op and, unless `RAYON_NUM_THREADS` is set,
/// answers by parsing /proc/cpuinfo each time (thousands of file reads per second while
/// decoding): the answer is fixed once here. mimalloc returns freed memory to the OS after
/// 10 ms by default, so a training step's large, short-lived buffers were faulted in afresh
/// (and zeroed by the kernel) at every step; it now keeps them for reuse. candle's worker
/// pool spins briefly instead of for a millisecond between ops (see `CANDLE_SPIN_LIMIT`).
/// rayon's global pool gets that thread count and a main thread's stack ([`on_workers`]).
pub fn configure() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT.to_string());
    }
    // Fails only when the pool already exists (a second call, or rayon used before): then
    // the existing pool serves.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .thread_name(|i| format!("minillm-worker-{i}"))
        .build_global();
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is a plain store in mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Runs `f` on a worker of rayon's global pool (the caller waits), so that the thread that
/// issues each parallel op (a matrix product, a fused kernel) works on it alongside the other
/// workers. Called from outside the pool, every such op instead hands its work to the workers
/// and sleeps until they finish, and waking it again costs a scheduler round trip per op:
/// hundreds per decoding step, ~4% of a 16-row GPT-2 decoding run on two cores (BENCHMARKS.md).
/// Commands run whole inside this (`main`), as do the benchmarks of what they do.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // From outside the pool, `scope` runs its body on a worker and blocks until it returns.
    rayon::scope(|_| f())
}

/// Stack of each pool worker: commands run on one ([`on_workers`]), so it gets what a main
/// thread would (autograd's graph walk recurses once per op of a long graph), not rayon's
/// 2 MiB default. Untouched pages cost nothing.
const WORKER_STACK_BYTES: usize = 64 << 20;

/// Spins of candle's idle pool workers before they sleep. candle's default (25,000) keeps a
/// worker spinning for about a millisecond after each of its ops, on a core that the next
/// (rayon-parallel) fused op or matrix product needs: 11% of a MiniLLM iteration on two cores.
const CANDLE_SPIN_LIMIT: u32 = 200;

/// `mi_option_purge_delay` in mimalloc's option enumeration (not exported by the bindings).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(test)]
mod tests {
    /// The work runs on a pool worker, and what it returns comes back.
    #[test]
    fn on_workers_runs_its_work_on_a_pool_worker() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is outside the pool");
        let (index, value) = super::on_workers(|| (rayon::current_thread_index(), 7));
        assert!(index.is_some(), "the work ran outside the pool");
        assert_eq!(value, 7);
    }
}
