//! Byte sizes (`128Mi`, `2Gi`, `512M`) and durations (`30s`, `500ms`, `10m`) as written in
//! `function.yaml`.

use std::time::Duration;

/// Parses a size such as `128Mi`, `1Gi`, `64M`, `1048576` (bytes) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "K" | "KB" | "k" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Formats bytes in the largest binary unit that divides them exactly (`128Mi`).
pub fn format_size(bytes: u64) -> String {
    for (unit, mul) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes >= mul && bytes.is_multiple_of(mul) {
            return format!("{}{unit}", bytes / mul);
        }
    }
    bytes.to_string()
}

/// Parses a duration such as `30s`, `1.5s`, `500ms`, `10m`, `1h`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A UTC calendar time: `(year, month, day, hour, minute, second, millisecond)`.
type Civil = (i64, i64, i64, i64, i64, i64, i64);

/// Splits Unix-epoch milliseconds into UTC calendar fields.
fn civil(ms: i64) -> Civil {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60, millis)
}

/// Formats Unix-epoch milliseconds as RFC 3339 UTC with milliseconds
/// (`2026-11-23T19:55:12.345Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let (y, m, d, hh, mm, ss, millis) = civil(ms);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{millis:03}Z")
}

/// Formats Unix-epoch milliseconds in the Common Log Format time API Gateway uses in
/// `requestContext.time` (`12/Mar/2020:19:03:58 +0000`).
pub fn clf_time(ms: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d, hh, mm, ss, _) = civil(ms);
    let mon = MONTHS[(m - 1) as usize];
    format!("{d:02}/{mon}/{y:04}:{hh:02}:{mm:02}:{ss:02} +0000")
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339_ms(951_782_400_123),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            super::rfc3339_ms(1_795_463_712_573),
            "2026-11-23T19:55:12.573Z"
        );
    }

    #[test]
    fn clf_time() {
        assert_eq!(
            super::clf_time(1_583_348_638_390),
            "04/Mar/2020:19:03:58 +0000"
        );
        assert_eq!(super::clf_time(0), "01/Jan/1970:00:00:00 +0000");
    }

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128Mi"), Some(128 << 20));
        assert_eq!(parse_size("2Gi"), Some(2 << 30));
        assert_eq!(parse_size("64M"), Some(64_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12Xi"), None);
        assert_eq!(parse_size("Mi"), None);
        assert_eq!(format_size(128 << 20), "128Mi");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("3 days"), None);
    }
}
