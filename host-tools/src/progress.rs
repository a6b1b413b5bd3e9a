//! Progress bars for long work: pre-copy of a large capsule, suspend and
//! resume of a large image, `lab up` of many VMs.
//!
//! A bar is drawn on standard error only when it is a terminal and the
//! command was not told to be quiet ([`set_quiet`], which the CLI calls for
//! `--json`). It appears only once the work has taken [`SHOW_AFTER`]: work
//! that ends sooner (the usual small capsule) leaves no trace on the screen.
//! A finished bar is cleared, so what the command prints afterwards stands
//! alone. While a bar is shown, other messages go through
//! [`Progress::println`] so they print above it instead of through it.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Work that ends within this shows no bar at all.
pub const SHOW_AFTER: Duration = Duration::from_millis(300);

static QUIET: AtomicBool = AtomicBool::new(false);

/// No progress bars for the rest of the process (`--json`: the output is for
/// a program, and so is whatever reads standard error next to it).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether bars may be drawn: not quiet, and standard error is a terminal.
pub fn enabled() -> bool {
    !QUIET.load(Ordering::Relaxed) && std::io::stderr().is_terminal()
}

/// A progress bar that is hidden until the work has taken [`SHOW_AFTER`],
/// and forever when bars are not [`enabled`]. Cleared when finished or
/// dropped (so an early return with `?` leaves a clean line too).
pub struct Progress {
    bar: ProgressBar,
    enabled: bool,
    shown: AtomicBool,
    since: Instant,
}

const BYTES_TEMPLATE: &str = "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} \
                              {binary_bytes_per_sec}, eta {eta}";
const COUNT_TEMPLATE: &str =
    "{spinner} {msg} [{wide_bar}] {pos}/{len}, {elapsed} elapsed, eta {eta}";

impl Progress {
    fn with_template(len: u64, template: &str, msg: impl Into<Cow<'static, str>>) -> Self {
        let style = ProgressStyle::with_template(template)
            .expect("progress template is valid")
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
            .with_style(style)
            .with_message(msg);
        Self {
            bar,
            enabled: enabled(),
            shown: AtomicBool::new(false),
            since: Instant::now(),
        }
    }

    /// A bar that is never drawn (for callers that want none).
    pub fn hidden() -> Self {
        let mut p = Self::with_template(0, COUNT_TEMPLATE, "");
        p.enabled = false;
        p
    }

    /// A bar over `len` bytes, showing bytes done, rate and ETA.
    pub fn bytes(len: u64, msg: impl Into<Cow<'static, str>>) -> Self {
        Self::with_template(len, BYTES_TEMPLATE, msg)
    }

    /// A bar over `len` things (VMs booting, …), with elapsed time and ETA.
    pub fn count(len: u64, msg: impl Into<Cow<'static, str>>) -> Self {
        Self::with_template(len, COUNT_TEMPLATE, msg)
    }

    /// The bar itself (hidden unless shown).
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }

    /// Whether the bar is on the screen now.
    pub fn is_shown(&self) -> bool {
        self.shown.load(Ordering::Relaxed)
    }

    /// Puts the bar on the screen once the work has taken long enough.
    fn maybe_show(&self) {
        if self.enabled
            && !self.is_shown()
            && !self.bar.is_finished()
            && self.since.elapsed() >= SHOW_AFTER
            && !self.shown.swap(true, Ordering::Relaxed)
        {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            // The spinner and elapsed time move even while no unit completes.
            self.bar.enable_steady_tick(Duration::from_millis(120));
        }
    }

    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.maybe_show();
    }

    pub fn inc(&self, delta: u64) {
        self.bar.inc(delta);
        self.maybe_show();
    }

    pub fn set_length(&self, len: u64) {
        self.bar.set_length(len);
        self.maybe_show();
    }

    pub fn set_message(&self, msg: impl Into<Cow<'static, str>>) {
        self.bar.set_message(msg);
        self.maybe_show();
    }

    /// Nothing completed, but time passed: lets a slow start show the bar.
    pub fn tick(&self) {
        self.maybe_show();
        if self.is_shown() {
            self.bar.tick();
        }
    }

    /// Prints a line on standard error: above the bar when it is shown, as a
    /// plain `eprintln!` otherwise.
    pub fn println(&self, line: impl AsRef<str>) {
        if self.is_shown() {
            self.bar.println(line);
        } else {
            eprintln!("{}", line.as_ref());
        }
    }

    /// Removes the bar from the screen (it leaves no line behind).
    pub fn finish(&self) {
        if !self.bar.is_finished() {
            self.bar.disable_steady_tick();
            self.bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_or_not_a_terminal_never_shows() {
        // Under `cargo test` standard error is captured or piped, and quiet
        // wins regardless.
        set_quiet(true);
        assert!(!enabled());
        let p = Progress::bytes(1 << 20, "test");
        std::thread::sleep(SHOW_AFTER + Duration::from_millis(20));
        p.inc(4096);
        p.tick();
        assert!(!p.is_shown());
        assert!(p.bar().is_hidden());
        assert_eq!(p.bar().position(), 4096);
        p.finish();
        assert!(p.bar().is_finished());
        set_quiet(false);
    }

    #[test]
    fn hidden_stays_hidden() {
        let p = Progress::hidden();
        std::thread::sleep(SHOW_AFTER + Duration::from_millis(20));
        p.inc(1);
        assert!(!p.is_shown());
    }

    #[test]
    fn templates_parse() {
        let p = Progress::count(3, "booting");
        p.inc(1);
        assert_eq!(p.bar().position(), 1);
        let b = Progress::bytes(10, "copy");
        b.set_length(20);
        b.set_position(15);
        assert_eq!(b.bar().length(), Some(20));
    }
}
