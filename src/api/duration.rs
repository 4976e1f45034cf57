//! ISO 8601 durations as Defender writes them (`PT3H`, `P1D`, `PT30M`). Days, hours, minutes,
//! seconds only: months and years have no fixed length and no place in an access window.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not an ISO 8601 duration of days, hours, minutes and seconds (e.g. PT1H, P1D): {why}"
)]
pub struct DurationError {
    pub input: String,
    pub why: &'static str,
}

pub fn parse_iso8601(input: &str) -> Result<Duration, DurationError> {
    let err = |why| DurationError {
        input: input.to_string(),
        why,
    };
    let rest = input
        .strip_prefix('P')
        .ok_or_else(|| err("it must start with P"))?;
    if rest.is_empty() {
        return Err(err("it has no components"));
    }
    let (date, time) = match rest.split_once('T') {
        Some((_, "")) => return Err(err("T must be followed by a component")),
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let mut seconds: u64 = 0;
    let mut add = |part: &str, units: &[(char, u64)]| -> Result<(), DurationError> {
        let part = sum_units(part, units, "unknown or misplaced unit").map_err(err)?;
        seconds = seconds
            .checked_add(part)
            .ok_or_else(|| err("duration too large"))?;
        Ok(())
    };
    add(date, &[('D', 86_400)])?;
    if let Some(t) = time {
        add(t, &[('H', 3_600), ('M', 60), ('S', 1)])?;
    }
    Ok(Duration::from_secs(seconds))
}

/// The operator's own duration settings (`--finished-grant-ttl`), as people write them for
/// Kubernetes tools: `24h`, `30m`, `1h30m`, `7d`, `0s`, or a bare number of seconds (`3600`).
/// Units come largest first, each at most once; nothing negative or fractional.
pub const SETTING_DURATION: &str = "^([0-9]+|([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?)$";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a duration such as 24h, 30m, 1h30m, 7d, 0s or 3600 (seconds): {why}")]
pub struct SettingDurationError {
    pub input: String,
    pub why: &'static str,
}

pub fn parse_setting(input: &str) -> Result<Duration, SettingDurationError> {
    let err = |why| SettingDurationError {
        input: input.to_string(),
        why,
    };
    if input.is_empty() {
        return Err(err("it is empty"));
    }
    if input.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = input.parse().map_err(|_| err("number too large"))?;
        return Ok(Duration::from_secs(n));
    }
    const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
    let seconds = sum_units(input, &UNITS, "units are d, h, m and s").map_err(err)?;
    Ok(Duration::from_secs(seconds))
}

/// Seconds in `part`, a run of `<number><unit>` pairs whose units come in the order of `units`
/// (largest first), each at most once. The error says why, for the caller's own error type.
fn sum_units(
    part: &str,
    units: &[(char, u64)],
    unknown_unit: &'static str,
) -> Result<u64, &'static str> {
    let mut seconds: u64 = 0;
    let mut number = String::new();
    let mut last_unit = None;
    for c in part.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let pos = units
            .iter()
            .position(|(u, _)| *u == c)
            .ok_or(unknown_unit)?;
        if number.is_empty() {
            return Err("a unit without a number");
        }
        if last_unit.is_some_and(|l| pos <= l) {
            return Err("units out of order or repeated");
        }
        last_unit = Some(pos);
        let n: u64 = number.parse().map_err(|_| "number too large")?;
        seconds = n
            .checked_mul(units[pos].1)
            .and_then(|s| seconds.checked_add(s))
            .ok_or("duration too large")?;
        number.clear();
    }
    if !number.is_empty() {
        return Err("a number without a unit");
    }
    Ok(seconds)
}

/// The shortest ISO 8601 spelling of a whole number of seconds (`PT1H30M`, `P1D`).
pub fn format_iso8601(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "PT0S".to_string();
    }
    let days = s / 86_400;
    s %= 86_400;
    let (h, m, sec) = (s / 3_600, (s % 3_600) / 60, s % 60);
    let mut out = String::from("P");
    if days > 0 {
        out.push_str(&format!("{days}D"));
    }
    if h + m + sec > 0 {
        out.push('T');
        for (v, u) in [(h, 'H'), (m, 'M'), (sec, 'S')] {
            if v > 0 {
                out.push_str(&format!("{v}{u}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defender_spellings() {
        assert_eq!(parse_iso8601("PT3H"), Ok(Duration::from_secs(3 * 3600)));
        assert_eq!(parse_iso8601("P1D"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_iso8601("PT30M"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_iso8601("P1DT1H1M1S"), Ok(Duration::from_secs(90_061)));
        assert_eq!(parse_iso8601("PT90S"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "", "P", "PT", "P1DT", "1H", "PT1", "PTH", "PT1M1H", "P1H", "PT1H1H", "P1W", "P1Y",
            "PT-1H",
        ] {
            assert!(parse_iso8601(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn schema_pattern_agrees_with_parser() {
        let re =
            regex_lite::Regex::new(crate::api::schema::ISO8601_DURATION).expect("valid pattern");
        for s in ["PT3H", "P1D", "PT30M", "P1DT1H1M1S", "PT90S", "P1DT5S"] {
            assert!(re.is_match(s) && parse_iso8601(s).is_ok(), "{s}");
        }
        for s in ["P", "PT", "P1DT", "PT1M1H", "P1H", "P1W", "PT1H1H"] {
            assert!(!re.is_match(s) && parse_iso8601(s).is_err(), "{s}");
        }
    }

    #[test]
    fn parses_setting_spellings() {
        let secs = |s| parse_setting(s).map(|d| d.as_secs());
        assert_eq!(secs("24h"), Ok(86_400));
        assert_eq!(secs("30m"), Ok(1_800));
        assert_eq!(secs("1h30m"), Ok(5_400));
        assert_eq!(secs("7d"), Ok(604_800));
        assert_eq!(secs("0s"), Ok(0));
        assert_eq!(secs("0"), Ok(0));
        assert_eq!(secs("3600"), Ok(3_600));
        assert_eq!(secs("1d2h3m4s"), Ok(93_784));
        for bad in [
            "",
            "h",
            "1x",
            "-1h",
            "1.5h",
            "1m1h",
            "1h1h",
            "1h ",
            " 1h",
            "PT1H",
            "1H",
            "99999999999999999999",
            "999999999999999999d",
        ] {
            assert!(parse_setting(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn setting_pattern_agrees_with_parser() {
        let re = regex_lite::Regex::new(SETTING_DURATION).expect("valid pattern");
        for s in ["24h", "30m", "1h30m", "7d", "0s", "0", "3600", "1d2h3m4s"] {
            assert!(re.is_match(s) && parse_setting(s).is_ok(), "{s}");
        }
        for s in [
            "h", "1x", "-1h", "1.5h", "1m1h", "1h1h", "1h ", "PT1H", "1H",
        ] {
            assert!(!re.is_match(s) && parse_setting(s).is_err(), "{s}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for secs in [1, 59, 60, 3600, 5400, 86_400, 90_061] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_iso8601(&format_iso8601(d)), Ok(d));
        }
    }
}
