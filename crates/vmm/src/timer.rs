//! Timers for devices: callbacks run on one timer thread per VM at guest-time deadlines.
//!
//! A device creates a [`Timer`] with a callback, then arms it for a deadline; re-arming replaces
//! the previous deadline. The callback receives the current guest time and typically raises an
//! interrupt line and re-arms. If the thread runs late, the callback runs once (devices decide
//! how to account for missed periods).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::bus::lock;
use crate::time::{GuestClock, Ns};

type Callback = Box<dyn FnMut(Ns) + Send>;

struct State {
    /// (deadline, timer id, generation)
    heap: BinaryHeap<Reverse<(Ns, usize, u64)>>,
    /// Current generation of each timer; an entry with an older generation is stale.
    gens: Vec<u64>,
    callbacks: Vec<Option<Arc<Mutex<Callback>>>>,
    /// The VM is paused: the thread runs no callback.
    paused: bool,
    /// The thread is inside a callback (pause waits for it to return).
    in_callback: bool,
}

/// The per-VM timer queue.
pub struct TimerQueue {
    clock: Arc<GuestClock>,
    state: Mutex<State>,
    cond: Condvar,
    stop: AtomicBool,
}

/// A device's timer.
#[derive(Clone)]
pub struct Timer {
    q: Arc<TimerQueue>,
    id: usize,
}

impl TimerQueue {
    pub fn new(clock: Arc<GuestClock>) -> Arc<Self> {
        Arc::new(TimerQueue {
            clock,
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                gens: Vec::new(),
                callbacks: Vec::new(),
                paused: false,
                in_callback: false,
            }),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
        })
    }

    pub fn clock(&self) -> &Arc<GuestClock> {
        &self.clock
    }

    /// A new, disarmed timer.
    pub fn timer(self: &Arc<Self>, cb: impl FnMut(Ns) + Send + 'static) -> Timer {
        let mut s = lock(&self.state);
        s.gens.push(0);
        s.callbacks.push(Some(Arc::new(Mutex::new(Box::new(cb)))));
        Timer {
            q: self.clone(),
            id: s.gens.len() - 1,
        }
    }

    /// The timer thread's body: run due callbacks until [`TimerQueue::shutdown`].
    pub fn run(&self) {
        let mut s = lock(&self.state);
        if self.clock.is_virtual() {
            // Deterministic time: the cores run due timers themselves ([`TimerQueue::run_due`]).
            while !self.stop.load(Ordering::Acquire) {
                s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            return;
        }
        while !self.stop.load(Ordering::Acquire) {
            if s.paused {
                s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let now = self.clock.now();
            match s.heap.peek().copied() {
                Some(Reverse((deadline, id, generation))) if deadline <= now => {
                    s.heap.pop();
                    if s.gens[id] != generation {
                        continue;
                    }
                    let Some(cb) = s.callbacks[id].clone() else {
                        continue;
                    };
                    s.in_callback = true;
                    drop(s);
                    (lock(&cb))(now);
                    s = lock(&self.state);
                    s.in_callback = false;
                    self.cond.notify_all();
                }
                Some(Reverse((deadline, _, _))) => {
                    let wait = Duration::from_nanos(self.clock.host_ns(deadline - now));
                    s = self
                        .cond
                        .wait_timeout(s, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None => s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Stop the thread (it returns from [`TimerQueue::run`]).
    /// Run every callback due at guest time `now` on this thread; returns the next deadline.
    pub fn run_due(&self, now: Ns) -> Option<Ns> {
        let mut s = lock(&self.state);
        loop {
            match s.heap.peek().copied() {
                Some(Reverse((deadline, id, generation))) if deadline <= now => {
                    s.heap.pop();
                    if s.gens[id] != generation {
                        continue;
                    }
                    let Some(cb) = s.callbacks[id].clone() else {
                        continue;
                    };
                    drop(s);
                    (lock(&cb))(deadline);
                    s = lock(&self.state);
                }
                Some(Reverse((deadline, id, generation))) => {
                    if s.gens[id] != generation {
                        s.heap.pop();
                        continue;
                    }
                    return Some(deadline);
                }
                None => return None,
            }
        }
    }

    /// Pause (true): no callback runs until resumed; returns once none is running.
    /// Resume (false).
    pub fn set_paused(&self, paused: bool) {
        let mut s = lock(&self.state);
        s.paused = paused;
        self.cond.notify_all();
        while paused && s.in_callback && !self.stop.load(Ordering::Acquire) {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Deadlines of armed timers, relative order kept (for diagnostics and tests).
    pub fn armed(&self) -> usize {
        let s = lock(&self.state);
        s.heap
            .iter()
            .filter(|Reverse((_, id, g))| s.gens[*id] == *g)
            .count()
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let _s = lock(&self.state);
        self.cond.notify_all();
    }
}

impl Timer {
    /// Run the callback at guest time `deadline` (replacing any earlier arming).
    pub fn arm(&self, deadline: Ns) {
        let mut s = lock(&self.q.state);
        s.gens[self.id] += 1;
        let g = s.gens[self.id];
        s.heap.push(Reverse((deadline, self.id, g)));
        self.q.cond.notify_all();
    }

    /// Cancel a pending deadline.
    pub fn disarm(&self) {
        let mut s = lock(&self.q.state);
        s.gens[self.id] += 1;
    }

    pub fn clock(&self) -> &Arc<GuestClock> {
        &self.q.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn callbacks_run_in_deadline_order_and_disarm_cancels() {
        let q = TimerQueue::new(Arc::new(GuestClock::new(1_000_000_000)));
        let (tx, rx) = mpsc::channel();
        let mk = |tag: u32| {
            let tx = tx.clone();
            q.timer(move |_| tx.send(tag).unwrap())
        };
        let (a, b, c) = (mk(1), mk(2), mk(3));
        let now = q.clock().now();
        b.arm(now + 20_000_000);
        a.arm(now + 10_000_000);
        c.arm(now + 15_000_000);
        c.disarm();
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.run());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "disarmed timer stayed silent"
        );
        // Re-arming from inside a callback works (periodic devices do this).
        let tx2 = tx.clone();
        let count = Arc::new(Mutex::new(0u32));
        let cnt = count.clone();
        let slot: Arc<Mutex<Option<Timer>>> = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let p = q.timer(move |now| {
            let mut n = cnt.lock().unwrap();
            *n += 1;
            if *n < 5 {
                slot2.lock().unwrap().as_ref().unwrap().arm(now + 1_000_000);
            } else {
                tx2.send(99).unwrap();
            }
        });
        *slot.lock().unwrap() = Some(p.clone());
        p.arm(q.clock().now());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 99);
        q.shutdown();
        t.join().unwrap();
    }
}
