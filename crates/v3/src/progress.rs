//! Progress of long work on a terminal: a bar appears once the work has taken a second, and
//! only when stderr is a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A progress callback (bytes done, bytes in all) for `label`; `finish` clears the bar.
pub struct Progress {
    label: &'static str,
    start: Instant,
    bar: Option<ProgressBar>,
    tty: bool,
}

impl Progress {
    pub fn new(label: &'static str) -> Self {
        Progress {
            label,
            start: Instant::now(),
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.tty || self.start.elapsed() < Duration::from_secs(1) {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_message(self.label);
            b
        });
        bar.set_length(total);
        bar.set_position(done);
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A spinner for waiting on another process (after a second, on a terminal).
pub struct Waiting {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Waiting {
    pub fn new(label: &'static str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::io::stderr().is_terminal().then(|| {
            std::thread::spawn(move || {
                let t = Instant::now();
                let mut bar = None;
                while !s2.load(std::sync::atomic::Ordering::Acquire) {
                    if t.elapsed() > Duration::from_secs(1) {
                        let b = bar.get_or_insert_with(|| {
                            let b = ProgressBar::new_spinner();
                            b.set_message(label);
                            b
                        });
                        b.tick();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
            })
        });
        Waiting { stop, thread }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
