//! Statics that the CPU or the virtio device reads and writes behind the
//! compiler's back (GDT, TSS, IDT, virtqueues, packet buffers).

use core::cell::UnsafeCell;

/// Memory accessed only through the raw pointer [`Shared::get`] gives, so
/// that no Rust reference ever claims exclusive access to what the hardware
/// (or the device model) may touch at the same time.
#[repr(transparent)]
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: the guest has one CPU; every access goes through raw pointers
// whose users (boot code, the main loop's driver) are documented at each
// dereference.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub const fn new(value: T) -> Self {
        Shared(UnsafeCell::new(value))
    }

    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}
