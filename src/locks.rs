//! Locks over plain bookkeeping (caches, counters, maps, a log file). A panic elsewhere while one
//! was held leaves data that is still usable, so a poisoned lock is taken as it is rather than
//! failing every caller after it.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
