//! Progress for long accounts: a bar redrawn in place on a terminal, plain
//! lines (every tenth of the way) when stderr is a file or a pipe.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Redraws at most this often on a terminal.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// Width of the bar in characters.
const BAR_WIDTH: usize = 30;

/// One phase's progress (on stderr).
pub struct Progress {
    label: &'static str,
    total: usize,
    done: usize,
    tty: bool,
    last_draw: Option<Instant>,
    last_tenth: usize,
}

impl Progress {
    /// Starts a phase of `total` steps.
    pub fn new(label: &'static str, total: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let p = Self {
            label,
            total,
            done: 0,
            tty,
            last_draw: None,
            last_tenth: 0,
        };
        if !tty && total > 0 {
            eprintln!("{label}: 0/{total}");
        }
        p
    }

    /// One more step done.
    pub fn inc(&mut self) {
        self.done += 1;
        if self.tty {
            let due = self.last_draw.is_none_or(|t| t.elapsed() >= REDRAW_EVERY);
            if due || self.done == self.total {
                self.draw();
            }
        } else if let Some(tenth) = (self.done * 10).checked_div(self.total) {
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!("{}: {}/{}", self.label, self.done, self.total);
            }
        }
    }

    fn draw(&mut self) {
        self.last_draw = Some(Instant::now());
        let filled = (self.done * BAR_WIDTH)
            .checked_div(self.total)
            .unwrap_or(BAR_WIDTH);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {}/{}",
            self.label,
            "#".repeat(filled.min(BAR_WIDTH)),
            " ".repeat(BAR_WIDTH - filled.min(BAR_WIDTH)),
            self.done,
            self.total
        );
        let _ = err.flush();
    }

    /// Ends the phase (the bar's line is finished).
    pub fn finish(mut self) {
        if self.tty && self.total > 0 {
            self.draw();
            eprintln!();
        }
    }
}
