//! Poison-tolerant locking, the one way the workspace takes a `std::sync::Mutex`.
//!
//! A mutex is poisoned when a thread panicked while holding it. Nothing in this workspace
//! keeps state that a panic half-way leaves unusable in a way a poison flag could report
//! usefully (the panic itself is logged and ends its thread), so every lock goes on with
//! the data as the panicking thread left it rather than spreading the panic.

use std::sync::{Condvar, Mutex, MutexGuard, WaitTimeoutResult};
use std::time::Duration;

/// [`Mutex::lock`] that takes a poisoned mutex's data as it is.
pub trait LockExt<T: ?Sized> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// [`Condvar::wait`] and [`Condvar::wait_timeout`] that take a poisoned mutex's data as it
/// is, like [`LockExt`].
pub trait CondvarExt {
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T>;
    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult);
}

impl CondvarExt for Condvar {
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        self.wait_timeout(guard, timeout)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_mutex_poisoned_by_a_panicking_holder_still_locks_with_its_data() {
        let shared = Arc::new(Mutex::new(vec![1]));
        let holder = shared.clone();
        let panicked = std::thread::spawn(move || {
            let mut data = holder.lock().unwrap();
            data.push(2);
            panic!("holder dies with the lock held");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.is_poisoned());
        assert_eq!(*shared.lock_unpoisoned(), vec![1, 2]);
    }

    #[test]
    fn a_wait_on_a_poisoned_mutex_times_out_with_its_data() {
        let shared = Arc::new(Mutex::new(7));
        let holder = shared.clone();
        let _ = std::thread::spawn(move || {
            let _guard = holder.lock().unwrap();
            panic!("poison");
        })
        .join();
        let changed = Condvar::new();
        let (guard, timeout) =
            changed.wait_timeout_unpoisoned(shared.lock_unpoisoned(), Duration::from_millis(1));
        assert!(timeout.timed_out());
        assert_eq!(*guard, 7);
    }
}
