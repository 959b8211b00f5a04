//! What `netbore http` prints while it runs: a status block (public URL, links and
//! their edges, origin health, requests per second) and a line per request.
//!
//! On a terminal the status block stays at the top (a scroll region below it holds the
//! request lines) and is redrawn when something changes and once a second; colours
//! only there, and never with `NO_COLOR`. Anywhere else (a pipe, a file) the output is
//! plain lines: the `URL -> origin` line first (scripts read it), then one line per
//! request, and one line per origin failure cause naming the cause and the fix.
//! `--json` prints the same as JSON events (`request`, `origin_error`, `origin_healthy`).

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use netbore_agent::AgentEvent;
use netbore_agent::inspect::{ConsoleEvent, Health, RequestLine};

/// The window requests per second are counted over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The log filter when the console draws on a terminal and `RUST_LOG` is not set:
/// log lines on stderr would land inside the status block and between request lines,
/// and what they say at `info` and `warn` (links, origin failures, warnings) the
/// console shows already.
pub const TERMINAL_LOG_FILTER: &str = "error";

/// Lines the status block takes at the top of a terminal.
const BLOCK_LINES: usize = 7;

/// How long the printer waits after writing a burst of request lines before it takes the
/// next: the lines that arrive meanwhile go out in one write (and, on a terminal, one
/// redraw of the block) instead of one each, and requests stop waking the printer.
/// Short enough that a line still appears at once to someone watching.
pub const CONSOLE_LINGER: Duration = Duration::from_millis(10);

/// Console events written in one burst at most, so a long burst is still printed in
/// pieces as it comes.
pub const CONSOLE_BURST: usize = 512;

/// What the status block shows.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// Public URL.
    pub url: Option<String>,
    /// Origin.
    pub origin: String,
    /// Edges linked now.
    pub edges: Vec<String>,
    /// Inspector address, when on.
    pub inspector: Option<String>,
    /// Is the origin answering?
    pub health: Option<Health>,
    /// Last failure, when failing.
    pub failure: Option<String>,
}

/// The console printer.
pub struct Console {
    /// Redraw a status block at the top (stdout is a terminal, text mode).
    pub tty: bool,
    /// Colour codes (a terminal, and no `NO_COLOR`).
    pub colour: bool,
    /// The status block's content.
    pub status: Status,
    recent: VecDeque<Instant>,
    drawn: bool,
}

impl Console {
    /// A console for stdout as it is (terminal or not).
    pub fn new(origin: String, inspector: Option<String>) -> Console {
        use std::io::IsTerminal;
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Console {
            tty,
            colour: tty && !no_color,
            status: Status {
                origin,
                inspector,
                ..Status::default()
            },
            recent: VecDeque::new(),
            drawn: false,
        }
    }

    /// Requests per second over [`RATE_WINDOW`].
    pub fn rate(&mut self, now: Instant) -> f64 {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.len() as f64 / RATE_WINDOW.as_secs_f64()
    }

    /// Takes in the agent's news; on a terminal, redraws the block.
    pub fn agent_event(&mut self, ev: &AgentEvent, out: &mut impl Write) {
        match ev {
            AgentEvent::Live { url, edges, .. } => {
                self.status.url = Some(url.clone());
                self.status.edges = edges.clone();
            }
            AgentEvent::Reconnecting { edges, .. } => self.status.edges = edges.clone(),
            AgentEvent::UrlChanged { url, .. } => self.status.url = Some(url.clone()),
            _ => {}
        }
        if self.tty {
            self.draw(out);
        }
    }

    /// Prints a request line or an origin failure (text mode); on a terminal, redraws
    /// the block.
    pub fn console_event(&mut self, ev: &ConsoleEvent, out: &mut impl Write) {
        self.line(ev, out);
        if self.tty {
            self.draw(out);
        }
    }

    /// Prints a request line or an origin failure (text mode) without redrawing the
    /// block: a burst of lines is printed with [`Console::line`], then drawn once.
    pub fn line(&mut self, ev: &ConsoleEvent, out: &mut impl Write) {
        match ev {
            ConsoleEvent::Request(r) => {
                self.recent.push_back(Instant::now());
                let _ = writeln!(out, "{}", request_line(r, self.colour));
            }
            ConsoleEvent::OriginError {
                cause,
                message,
                fix,
            } => {
                self.status.health = Some(Health::Failing(*cause));
                self.status.failure = Some(cause.label().to_string());
                let _ = writeln!(
                    out,
                    "{}",
                    paint(
                        &format!("origin error: {} ({message}); fix: {fix}", cause.label()),
                        RED,
                        self.colour
                    )
                );
            }
            ConsoleEvent::OriginHealthy => {
                self.status.health = Some(Health::Healthy);
                self.status.failure = None;
                let _ = writeln!(
                    out,
                    "{}",
                    paint("origin answering again", GREEN, self.colour)
                );
            }
        }
        if let ConsoleEvent::Request(r) = ev
            && r.status.is_some()
            && self.status.health != Some(Health::Healthy)
            && self.status.failure.is_none()
        {
            self.status.health = Some(Health::Healthy);
        }
    }

    /// The status block's lines.
    pub fn block(&mut self) -> Vec<String> {
        let rate = self.rate(Instant::now());
        let c = self.colour;
        let health = match (&self.status.health, &self.status.failure) {
            (_, Some(f)) => paint(&format!("failing: {f}"), RED, c),
            (Some(Health::Healthy), _) => paint("answering", GREEN, c),
            _ => "no request yet".to_string(),
        };
        let edges = if self.status.edges.is_empty() {
            paint("none (reconnecting)", YELLOW, c)
        } else {
            format!(
                "{}: {}",
                self.status.edges.len(),
                self.status.edges.join(", ")
            )
        };
        vec![
            paint("netbore", BOLD, c),
            format!(
                "  URL        {}",
                self.status.url.as_deref().unwrap_or("(connecting…)")
            ),
            format!("  Origin     {}  ({health})", self.status.origin),
            format!("  Links      {edges}"),
            format!(
                "  Inspector  {}",
                self.status.inspector.as_deref().unwrap_or("off")
            ),
            format!("  Requests   {rate:.1}/s"),
            "─".repeat(60),
        ]
    }

    /// Draws the block at the top of the terminal, keeping the cursor in the scroll
    /// region below it.
    pub fn draw(&mut self, out: &mut impl Write) {
        let lines = self.block();
        if !self.drawn {
            // Clear, then confine scrolling to the lines under the block.
            let _ = write!(
                out,
                "\x1b[2J\x1b[{};r\x1b[{};1H",
                BLOCK_LINES + 1,
                BLOCK_LINES + 1
            );
            self.drawn = true;
        }
        let _ = write!(out, "\x1b7\x1b[H");
        for l in lines.iter().take(BLOCK_LINES) {
            let _ = write!(out, "\x1b[2K{l}\r\n");
        }
        let _ = write!(out, "\x1b8");
        let _ = out.flush();
    }

    /// Gives the terminal its whole screen back.
    pub fn finish(&mut self, out: &mut impl Write) {
        if self.drawn {
            let _ = write!(out, "\x1b[r");
            let _ = out.flush();
        }
    }
}

const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const CYAN: &str = "36";
const BOLD: &str = "1";

fn paint(s: &str, code: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
pub fn clock(unix_ms: u64) -> String {
    let s = (unix_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Bytes, short.
pub fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1024 * 1024 * 1024 => format!("{:.1} MiB", n as f64 / 1048576.0),
        n => format!("{:.2} GiB", n as f64 / 1073741824.0),
    }
}

/// One request: `time method path status duration in/out`.
pub fn request_line(r: &RequestLine, colour: bool) -> String {
    let status = match r.status {
        Some(s) => {
            let code = match s {
                200..=299 => GREEN,
                300..=399 => CYAN,
                400..=499 => YELLOW,
                _ => RED,
            };
            paint(&s.to_string(), code, colour)
        }
        None => paint("---", RED, colour),
    };
    let mut line = format!(
        "{} {:<7} {} {} {} ms in {} out {}",
        clock(r.at_unix_ms),
        r.method,
        r.path,
        status,
        r.duration_ms,
        bytes(r.bytes_in),
        bytes(r.bytes_out)
    );
    if let Some(of) = r.replay_of {
        line.push_str(&format!(" (replay of #{of})"));
    }
    if let Some(e) = &r.error {
        line.push_str(&format!(" ({e})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> RequestLine {
        RequestLine {
            id: 1,
            at_unix_ms: 3_723_000,
            method: "POST".into(),
            path: "/hook?token=[redacted]".into(),
            status: Some(201),
            duration_ms: 12,
            bytes_in: 2048,
            bytes_out: 5,
            replay_of: None,
            error: None,
        }
    }

    #[test]
    fn a_plain_line_names_time_method_path_status_duration_and_bytes() {
        assert_eq!(
            request_line(&line(), false),
            "01:02:03 POST    /hook?token=[redacted] 201 12 ms in 2.0 KiB out 5 B"
        );
        let coloured = request_line(&line(), true);
        assert!(coloured.contains("\x1b[32m201\x1b[0m"), "{coloured:?}");
    }

    #[test]
    fn a_failed_request_says_why() {
        let mut r = line();
        r.status = None;
        r.error = Some("connection refused: nothing listens".into());
        assert!(
            request_line(&r, false)
                .ends_with("--- 12 ms in 2.0 KiB out 5 B (connection refused: nothing listens)")
        );
    }
}
