//! Proleptic Gregorian calendar conversions (UTC, no leap seconds).
//!
//! Used by the RTC to turn "seconds since the Unix epoch" into the broken-down
//! fields the guest reads, and back when the guest sets the clock.
//!
//! The conversion works on a calendar whose years start on 1 March, so that the
//! leap day is the last day of the (shifted) year and every month length except
//! February's is fixed. A 400-year Gregorian cycle has exactly 146 097 days.

/// Days in one 400-year Gregorian cycle.
const DAYS_PER_CYCLE: i128 = 146_097;
/// Days from 0000-03-01 to 1970-01-01.
const EPOCH_SHIFT: i128 = 719_468;
/// Seconds per day.
const SECS_PER_DAY: i64 = 86_400;

/// Returns whether `year` is a Gregorian leap year.
pub fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Number of days in `month` (1-12) of `year`; 0 for an invalid month.
pub fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Converts a day number (days since 1970-01-01) to `(year, month, day)`.
fn date_from_days(days: i64) -> (i64, u8, u8) {
    let shifted = days as i128 + EPOCH_SHIFT;
    let cycle = shifted.div_euclid(DAYS_PER_CYCLE);
    let day_of_cycle = shifted.rem_euclid(DAYS_PER_CYCLE); // 0..=146096
    // Year within the cycle: remove the leap days that precede this day. The
    // corrections (every 4th year, except every 100th, except the 400th) make
    // the division by 365 exact for March-based years.
    let year_of_cycle = (day_of_cycle - day_of_cycle / 1460 + day_of_cycle / 36_524
        - day_of_cycle / (DAYS_PER_CYCLE - 1))
        / 365; // 0..=399
    let day_of_year =
        day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100); // 0..=365
    // Month index counted from March: month lengths 31,30,31,30,31,31,30,31,30,31,31,(28|29)
    // follow the linear pattern day_of_year = (153 * m + 2) / 5.
    let march_month = (5 * day_of_year + 2) / 153; // 0..=11
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = cycle * 400 + year_of_cycle + i128::from(month <= 2);
    (clamp_i64(year), month as u8, day as u8)
}

/// Converts a (possibly out-of-range, normalised arithmetically) date to days
/// since 1970-01-01.
fn days_from_date(year: i64, month: i64, day: i64) -> i128 {
    // Normalise the month into 1..=12 by carrying into the year.
    let month0 = month as i128 - 1;
    let year = year as i128 + month0.div_euclid(12);
    let month = month0.rem_euclid(12) + 1;
    let march_year = if month <= 2 { year - 1 } else { year };
    let cycle = march_year.div_euclid(400);
    let year_of_cycle = march_year.rem_euclid(400);
    let march_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * march_month + 2) / 5 + (day as i128 - 1);
    let day_of_cycle = year_of_cycle * 365 + year_of_cycle / 4 - year_of_cycle / 100 + day_of_year;
    cycle * DAYS_PER_CYCLE + day_of_cycle - EPOCH_SHIFT
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Breaks Unix seconds down into
/// `(year, month 1-12, day 1-31, hour, minute, second, weekday)` where weekday
/// is 0 = Sunday … 6 = Saturday.
pub fn civil_from_unix(secs: i64) -> (i64, u8, u8, u8, u8, u8, u8) {
    let days = secs.div_euclid(SECS_PER_DAY);
    let tod = secs.rem_euclid(SECS_PER_DAY);
    let (year, month, day) = date_from_days(days);
    // 1970-01-01 was a Thursday (weekday 4).
    let weekday = (days.rem_euclid(7) + 4) % 7;
    (
        year,
        month,
        day,
        (tod / 3600) as u8,
        (tod / 60 % 60) as u8,
        (tod % 60) as u8,
        weekday as u8,
    )
}

/// Inverse of [`civil_from_unix`]: Unix seconds for the given UTC date and time.
///
/// Out-of-range fields are normalised arithmetically (like C `mktime`): month
/// 13 is January of the next year, day 0 is the last day of the previous month,
/// hour 24 is midnight of the next day. The result saturates at the `i64` range.
pub fn unix_from_civil(year: i64, month: u8, day: u8, hour: u8, min: u8, sec: u8) -> i64 {
    let days = days_from_date(year, i64::from(month), i64::from(day));
    let secs = days * SECS_PER_DAY as i128
        + i128::from(hour) * 3600
        + i128::from(min) * 60
        + i128::from(sec);
    clamp_i64(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0, 4));
        assert_eq!(unix_from_civil(1970, 1, 1, 0, 0, 0), 0);
    }

    #[test]
    fn known_dates() {
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        assert_eq!(civil_from_unix(951_827_696), (2000, 2, 29, 12, 34, 56, 2));
        // 2038-01-19 03:14:07, Tuesday (32-bit time_t limit).
        assert_eq!(civil_from_unix(2_147_483_647), (2038, 1, 19, 3, 14, 7, 2));
        // 1969-12-31 23:59:59, Wednesday.
        assert_eq!(civil_from_unix(-1), (1969, 12, 31, 23, 59, 59, 3));
        // 2024-03-01 00:00:00, Friday.
        assert_eq!(civil_from_unix(1_709_251_200), (2024, 3, 1, 0, 0, 0, 5));
    }

    #[test]
    fn leap_years() {
        assert!(is_leap(2000));
        assert!(is_leap(2024));
        assert!(!is_leap(1900));
        assert!(!is_leap(2100));
        assert!(!is_leap(2023));
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
        assert_eq!(days_in_month(2000, 2), 29);
        // The day after 28 Feb in 2100 (not leap) is 1 March.
        let t = unix_from_civil(2100, 2, 28, 0, 0, 0) + 86_400;
        let c = civil_from_unix(t);
        assert_eq!((c.0, c.1, c.2), (2100, 3, 1));
        let t = unix_from_civil(2000, 2, 28, 0, 0, 0) + 86_400;
        let c = civil_from_unix(t);
        assert_eq!((c.0, c.1, c.2), (2000, 2, 29));
        // Year lengths.
        assert_eq!(
            unix_from_civil(2024, 1, 1, 0, 0, 0) - unix_from_civil(2023, 1, 1, 0, 0, 0),
            365 * 86_400
        );
        assert_eq!(
            unix_from_civil(2025, 1, 1, 0, 0, 0) - unix_from_civil(2024, 1, 1, 0, 0, 0),
            366 * 86_400
        );
    }

    #[test]
    fn round_trip_every_day_over_several_cycles() {
        // Walk day by day across 1600-2401 (covers 100/400-year rules) and
        // check that the inverse agrees and that days are consecutive.
        let start = unix_from_civil(1600, 1, 1, 0, 0, 0);
        let mut prev: Option<(i64, u8, u8, u8)> = None;
        for i in 0..(801 * 366) {
            let t = start + i * 86_400 + 3661;
            let (y, m, d, h, mi, s, wd) = civil_from_unix(t);
            assert_eq!((h, mi, s), (1, 1, 1));
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            assert_eq!(unix_from_civil(y, m, d, h, mi, s), t);
            if let Some((py, pm, pd, pwd)) = prev {
                assert_eq!(wd, (pwd + 1) % 7);
                if d == 1 {
                    assert_eq!(pd, days_in_month(py, pm));
                } else {
                    assert_eq!((py, pm, pd + 1), (y, m, d));
                }
            }
            prev = Some((y, m, d, wd));
        }
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            unix_from_civil(2023, 13, 1, 0, 0, 0),
            unix_from_civil(2024, 1, 1, 0, 0, 0)
        );
        assert_eq!(
            unix_from_civil(2024, 3, 0, 0, 0, 0),
            unix_from_civil(2024, 2, 29, 0, 0, 0)
        );
        assert_eq!(
            unix_from_civil(2024, 0, 1, 0, 0, 0),
            unix_from_civil(2023, 12, 1, 0, 0, 0)
        );
        assert_eq!(
            unix_from_civil(2024, 1, 1, 24, 0, 0),
            unix_from_civil(2024, 1, 2, 0, 0, 0)
        );
    }

    #[test]
    fn extremes_do_not_panic() {
        for &t in &[i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 86_400] {
            let (y, m, d, h, mi, s, wd) = civil_from_unix(t);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            assert!(h < 24 && mi < 60 && s < 60 && wd < 7);
            let _ = unix_from_civil(y, m, d, h, mi, s);
        }
        assert_eq!(unix_from_civil(i64::MAX, 255, 255, 255, 255, 255), i64::MAX);
        assert_eq!(unix_from_civil(i64::MIN, 0, 0, 0, 0, 0), i64::MIN);
    }
}
