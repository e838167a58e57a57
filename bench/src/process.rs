//! Child processes: started with `kill_on_drop`, their output drained (and
//! its tail kept for error messages), stopped with SIGTERM by PID, and their
//! memory read from `/proc`.

use std::{
    collections::VecDeque,
    path::Path,
    process::{ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use anyhow::Context;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::oneshot,
    task::JoinHandle,
};

/// How long a process may take to print the line that says it is ready, and
/// to exit after SIGTERM.
pub const PROCESS_WAIT: Duration = Duration::from_secs(60);

/// Lines kept for error messages.
const TAIL_LINES: usize = 40;
/// Warning and error lines kept for the summary.
const PROBLEM_LINES: usize = 10;

/// A fresh `hookrelay-bench-*` directory in `base`, or in the system's
/// temporary directory; deleted when dropped.
pub fn temp_dir(base: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("hookrelay-bench-");
    match base {
        Some(base) => builder.tempdir_in(base),
        None => builder.tempdir(),
    }
    .context("creating a temporary directory")
}

/// A command for one of the binaries under test: output piped, the
/// environment's `RUST_LOG` and `HOOKRELAY_*` settings left out (so the
/// defaults are measured), killed when dropped.
pub fn command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOOKRELAY_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Which output stream carries the "ready" line.
#[derive(Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Default)]
struct LogState {
    tail: VecDeque<String>,
    problems: Vec<String>,
    warnings: u64,
    errors: u64,
}

/// What a process printed: the last lines, and its warnings and errors.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<LogState>>);

impl Log {
    fn push(&self, line: String) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let problem = if line.contains(" ERROR ") {
            state.errors += 1;
            true
        } else if line.contains(" WARN ") {
            state.warnings += 1;
            true
        } else {
            false
        };
        if problem && state.problems.len() < PROBLEM_LINES {
            state.problems.push(line.clone());
        }
        if state.tail.len() == TAIL_LINES {
            state.tail.pop_front();
        }
        state.tail.push_back(line);
    }

    /// The last lines, one per line.
    pub fn tail(&self) -> String {
        let state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.tail.iter().map(|l| format!("  | {l}\n")).collect()
    }

    /// (warning lines, error lines, the first few of them)
    pub fn problems(&self) -> (u64, u64, Vec<String>) {
        let state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (state.warnings, state.errors, state.problems.clone())
    }
}

/// Reads `stream` to its end into `log`; sends the first line containing
/// `needle` through `ready`.
fn drain(
    stream: impl AsyncRead + Unpin + Send + 'static,
    log: Log,
    mut ready: Option<(String, oneshot::Sender<String>)>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if ready
                .as_ref()
                .is_some_and(|(needle, _)| line.contains(needle.as_str()))
            {
                if let Some((_, tx)) = ready.take() {
                    let _ = tx.send(line.clone());
                }
            }
            log.push(line);
        }
    });
}

/// A running child process.
pub struct Proc {
    name: &'static str,
    child: Child,
    pid: u32,
    log: Log,
}

impl Proc {
    /// Starts `cmd` (from [`command`]) and waits for a line containing
    /// `needle` on `stream`; returns the process and that line. Both streams
    /// are read for as long as the process lives, so it never blocks on a
    /// full pipe.
    pub async fn spawn(
        name: &'static str,
        mut cmd: Command,
        stream: Stream,
        needle: &str,
    ) -> anyhow::Result<(Proc, String)> {
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let log = Log::default();
        let (tx, rx) = oneshot::channel();
        let mut ready = Some((needle.to_owned(), tx));
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let (out_ready, err_ready) = match stream {
            Stream::Stdout => (ready.take(), None),
            Stream::Stderr => (None, ready.take()),
        };
        drain(stdout, log.clone(), out_ready);
        drain(stderr, log.clone(), err_ready);
        let mut proc = Proc {
            name,
            child,
            pid,
            log,
        };
        let line = match tokio::time::timeout(PROCESS_WAIT, rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => {
                // The stream ended: give the process a moment to be reaped.
                let status = tokio::time::timeout(Duration::from_secs(5), proc.child.wait()).await;
                anyhow::bail!(
                    "{name} ended its output without a line containing {needle:?} ({}); its last lines:\n{}",
                    match status {
                        Ok(Ok(status)) => status.to_string(),
                        _ => "still running".to_owned(),
                    },
                    proc.log.tail()
                )
            }
            Err(_) => anyhow::bail!(
                "{name} printed no line containing {needle:?} within {PROCESS_WAIT:?}; its last lines:\n{}",
                proc.log.tail()
            ),
        };
        Ok((proc, line))
    }

    /// Starts `cmd` without waiting for any line (for programs whose
    /// readiness is checked otherwise).
    pub fn start(name: &'static str, mut cmd: Command) -> anyhow::Result<Proc> {
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let log = Log::default();
        drain(
            child.stdout.take().context("no stdout pipe")?,
            log.clone(),
            None,
        );
        drain(
            child.stderr.take().context("no stderr pipe")?,
            log.clone(),
            None,
        );
        Ok(Proc {
            name,
            child,
            pid,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    /// An error if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self
            .child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))?
        {
            anyhow::bail!(
                "{} (pid {}) exited unexpectedly ({status}); its last lines:\n{}",
                self.name,
                self.pid,
                self.log.tail()
            );
        }
        Ok(())
    }

    /// Sends SIGTERM (if the process is still ours to signal: not yet
    /// reaped, so its PID cannot have been reused) and waits for it to exit.
    /// When it does not exit in time, dropping the `Proc` kills it.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let kill = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdin(Stdio::null())
            .status()
            .await
            .context("running kill -TERM")?;
        anyhow::ensure!(kill.success(), "kill -TERM {} failed", self.pid);
        match tokio::time::timeout(PROCESS_WAIT, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => anyhow::bail!(
                "{} (pid {}) did not exit within {PROCESS_WAIT:?} of SIGTERM; its last lines:\n{}",
                self.name,
                self.pid,
                self.log.tail()
            ),
        }
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB; `None`
/// where there is no `/proc` or the process is gone.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// Samples a process's resident set size every 100 ms and keeps the peak.
pub struct RssSampler {
    pid: u32,
    peak_kib: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let peak = peak_kib.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Some(kib) = status_kib(pid, "VmRSS") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
            }
        });
        RssSampler {
            pid,
            peak_kib,
            task,
        }
    }

    /// The peak since the start or the last call (one more sample
    /// included), and a fresh start for the next phase.
    pub fn take_peak(&self) -> Option<u64> {
        if let Some(kib) = status_kib(self.pid, "VmRSS") {
            self.peak_kib.fetch_max(kib, Ordering::Relaxed);
        }
        Some(self.peak_kib.swap(0, Ordering::Relaxed)).filter(|kib| *kib > 0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// SIGTERM to each, in order; their warnings and errors on stderr.
pub async fn stop_all(procs: Vec<(&'static str, &mut Proc)>) -> anyhow::Result<()> {
    for (name, proc) in procs {
        let status = proc.terminate().await?;
        if !status.success() {
            eprintln!("warning: {name} exited with {status} after SIGTERM");
        }
        report_problems(name, proc);
    }
    Ok(())
}

/// Prints a process's warnings and errors, if any, to stderr.
pub fn report_problems(name: &str, proc: &Proc) {
    let (warnings, errors, lines) = proc.log().problems();
    if warnings + errors > 0 {
        eprintln!("{name} logged {warnings} warning(s) and {errors} error(s); the first:");
        for line in lines {
            eprintln!("  | {line}");
        }
    }
}
