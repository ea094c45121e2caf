//! What the processes under test cost: CPU seconds and RSS from `/proc/<pid>/stat`, our
//! own CPU from `getrusage`, and Postgres's from every process named `postgres`.

use std::collections::HashMap;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// CPU seconds (user + system) and RSS bytes of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu: f64,
    pub rss: u64,
}

/// `comm`, CPU seconds and RSS of `pid`, or None when it is gone.
fn stat(pid: u32) -> Option<(String, Usage)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    // Fields after the command: state is field 3, utime 14, stime 15, rss 24.
    let f: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    let cpu = (num(14)? + num(15)?) as f64 / clock_ticks();
    Some((
        comm,
        Usage {
            cpu,
            rss: num(24)? * page_size(),
        },
    ))
}

pub fn usage(pid: u32) -> Option<Usage> {
    stat(pid).map(|(_, u)| u)
}

/// Sum over `pids` (missing ones count as zero).
pub fn total(pids: &[u32]) -> Usage {
    pids.iter()
        .filter_map(|&p| usage(p))
        .fold(Usage::default(), |a, u| Usage {
            cpu: a.cpu + u.cpu,
            rss: a.rss + u.rss,
        })
}

/// Our own CPU seconds (every thread of this process).
pub fn own_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// CPU seconds of every process named `postgres`, by pid (backends come and go, so a
/// delta is taken pid by pid with [`cpu_delta`]).
pub fn postgres_cpu() -> HashMap<u32, f64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((comm, u)) = stat(pid) {
            if comm == "postgres" {
                out.insert(pid, u.cpu);
            }
        }
    }
    out
}

/// CPU spent between two [`postgres_cpu`] samples by the processes alive at the second.
pub fn cpu_delta(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, a)| a - before.get(pid).copied().unwrap_or(0.0))
        .filter(|d| *d > 0.0)
        // Not `sum()`: an empty float sum is -0.0, which prints as "-0.00".
        .fold(0.0, |total, d| total + d)
}

/// The 1-minute load average, for the record of how busy the machine was.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.rss > 0);
        assert!(own_cpu() >= 0.0);
        assert!(usage(u32::MAX).is_none());
    }
}
