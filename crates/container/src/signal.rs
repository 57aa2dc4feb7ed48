//! Signal names and numbers as `kill` takes them: `9`, `KILL`, `SIGKILL`, `sigterm`,
//! `RTMIN+3`.

use crate::ContainerError;

const NAMES: [(&str, i32); 31] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("SYS", 31),
];

const SIGRTMIN: i32 = 34;
const SIGRTMAX: i32 = 64;

pub fn parse(text: &str) -> Result<i32, ContainerError> {
    let unknown = || ContainerError::UnknownSignal(text.to_string());
    if let Ok(n) = text.parse::<i32>() {
        // 0 sends nothing: it asks whether the container's process is there, as kill(2).
        return if (0..=SIGRTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(unknown())
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = NAMES.iter().find(|(known, _)| *known == name) {
        return Ok(n);
    }
    let realtime = |base: i32, rest: &str, sign: i32| -> Option<i32> {
        let offset = if rest.is_empty() {
            0
        } else {
            rest.parse::<i32>().ok()?
        };
        let n = base + sign * offset;
        (SIGRTMIN..=SIGRTMAX).contains(&n).then_some(n)
    };
    let parsed = if let Some(rest) = name.strip_prefix("RTMIN") {
        realtime(SIGRTMIN, rest.trim_start_matches('+'), 1)
    } else if let Some(rest) = name.strip_prefix("RTMAX") {
        realtime(SIGRTMAX, rest.trim_start_matches('-'), -1)
    } else {
        None
    };
    parsed.ok_or_else(unknown)
}

pub fn name(signal: i32) -> String {
    NAMES
        .iter()
        .find(|(n, s)| *s == signal && *n != "IOT")
        .map(|(n, _)| format!("SIG{n}"))
        .unwrap_or_else(|| signal.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_prefixes_parse() {
        assert_eq!(parse("9").unwrap(), 9);
        assert_eq!(parse("0").unwrap(), 0);
        assert_eq!(parse("KILL").unwrap(), 9);
        assert_eq!(parse("SIGTERM").unwrap(), 15);
        assert_eq!(parse("sigusr1").unwrap(), 10);
        assert_eq!(parse("RTMIN+3").unwrap(), 37);
        assert_eq!(parse("SIGRTMAX").unwrap(), 64);
    }

    #[test]
    fn unknown_signals_are_rejected() {
        for bad in ["", "65", "-1", "SIGFOO", "RTMIN+40", "9x"] {
            assert!(
                matches!(parse(bad), Err(ContainerError::UnknownSignal(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_print_with_sig_prefix() {
        assert_eq!(name(15), "SIGTERM");
        assert_eq!(name(6), "SIGABRT");
        assert_eq!(name(40), "40");
    }
}
