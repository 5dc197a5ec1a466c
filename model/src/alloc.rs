//! A global allocator that keeps large freed blocks for reuse.
//!
//! Owns: the process's large allocations (the binaries install it with `#[global_allocator]`).
//! Must not allocate itself or know what the blocks hold.
//!
//! Why: a forward pass allocates and frees tensors of the same few sizes every step, many of
//! them tens of MiB (flan-t5-small at batch 8 x 512 tokens: 50 MiB of attention scores per
//! layer). glibc's malloc serves blocks above 32 MiB (its largest `mmap` threshold) with a
//! fresh `mmap` and unmaps them on free, so every step page-faults them in again (the counts
//! are in docs/BENCHMARKS.md, `perf stat -e page-faults` on `meshtune bench forward`). This
//! allocator keeps up to [`DEFAULT_CACHE_BYTES`] of freed
//! blocks of at least [`MIN_CACHED`] bytes in a few slots and hands a block back out to the
//! next allocation of exactly the same size and alignment; everything else goes to the system
//! allocator unchanged. `MESHTUNE_ALLOC_CACHE_MB` sets the cap (0 turns the cache off).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks smaller than this go straight to the system allocator.
pub const MIN_CACHED: usize = 1 << 20;
/// Default cap on the bytes held in the cache.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;
const SLOTS: usize = 48;

#[derive(Clone, Copy)]
struct Block {
    ptr: *mut u8,
    size: usize,
    align: usize,
}

struct Cache {
    blocks: [Option<Block>; SLOTS],
    bytes: usize,
}

// SAFETY: the cache only stores pointers to blocks nobody else holds; they are handed out to one
// caller at a time under the mutex.
unsafe impl Send for Cache {}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    blocks: [None; SLOTS],
    bytes: 0,
});

/// usize::MAX until read from the environment.
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

fn cap() -> usize {
    let cap = CAP.load(Ordering::Relaxed);
    if cap != usize::MAX {
        return cap;
    }
    // Reading the environment allocates only small strings, which never reach the cache.
    let cap = std::env::var("MESHTUNE_ALLOC_CACHE_MB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|mb| mb.saturating_mul(1 << 20))
        .unwrap_or(DEFAULT_CACHE_BYTES);
    CAP.store(cap, Ordering::Relaxed);
    cap
}

/// The allocator: [`System`] plus the cache of large blocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct CachingAllocator;

impl CachingAllocator {
    fn take(layout: Layout) -> Option<*mut u8> {
        let mut cache = CACHE.lock().ok()?;
        let slot = cache
            .blocks
            .iter_mut()
            .find(|b| b.is_some_and(|b| b.size == layout.size() && b.align == layout.align()))?;
        let block = slot.take()?;
        cache.bytes -= block.size;
        Some(block.ptr)
    }

    /// Keeps the block; false when it does not fit (the caller frees it).
    fn keep(ptr: *mut u8, layout: Layout) -> bool {
        let cap = cap();
        let Ok(mut cache) = CACHE.lock() else {
            return false;
        };
        if cache.bytes + layout.size() > cap {
            return false;
        }
        let Some(slot) = cache.blocks.iter_mut().find(|b| b.is_none()) else {
            return false;
        };
        *slot = Some(Block {
            ptr,
            size: layout.size(),
            align: layout.align(),
        });
        cache.bytes += layout.size();
        true
    }
}

// SAFETY: every block returned was allocated by `System` with exactly the requested size and
// alignment (cached blocks are only reused for an identical layout), and every block is freed
// by `System` or kept for such reuse.
unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_CACHED
            && let Some(ptr) = Self::take(layout)
        {
            return ptr;
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_CACHED
            && let Some(ptr) = Self::take(layout)
        {
            // SAFETY: the block holds `layout.size()` bytes.
            unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
            return ptr;
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= MIN_CACHED && Self::keep(ptr, layout) {
            return;
        }
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN_CACHED && new_size < MIN_CACHED {
            // SAFETY: forwarded; small blocks never enter the cache.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: as `GlobalAlloc::realloc`'s default: a new block, the common prefix copied,
        // the old block released through `dealloc`.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_large_block_is_reused_for_the_same_layout_and_zeroed_on_request() {
        let a = CachingAllocator;
        let layout = Layout::from_size_align(MIN_CACHED + 4096 * 7 + 12, 64).expect("layout");
        // SAFETY: allocation and release with matching layouts.
        unsafe {
            let first = a.alloc(layout);
            assert!(!first.is_null());
            std::ptr::write_bytes(first, 0xAB, layout.size());
            a.dealloc(first, layout);
            let second = a.alloc_zeroed(layout);
            assert_eq!(second, first, "the cached block comes back");
            let bytes = std::slice::from_raw_parts(second, layout.size());
            assert!(bytes.iter().all(|&b| b == 0));
            // Another size or alignment never gets it.
            a.dealloc(second, layout);
            let other = Layout::from_size_align(layout.size() + 1, 64).expect("layout");
            let third = a.alloc(other);
            assert_ne!(third, second);
            let grown = a.realloc(third, other, other.size() * 2);
            assert!(!grown.is_null());
            a.dealloc(
                grown,
                Layout::from_size_align(other.size() * 2, 64).expect("layout"),
            );
            let again = a.alloc(layout);
            assert_eq!(again, second);
            a.dealloc(again, layout);
        }
    }
}
