//! Periodic tasks as declared: when each fires (`every` N seconds, or a five-field `cron`
//! expression in an explicit timezone), and what it submits. Pure: the firing loop is in
//! `crate::beat`.
//!
//! Slots are instants every replica computes alike: `every` slots are multiples of the period
//! since the Unix epoch; `cron` slots are the minutes the expression matches on the timezone's
//! clock. A firing's task id is `schedule:<name>:<slot in ms>`, so a slot submitted twice (two
//! leaders for a moment, a retried submission) is one task.

use std::fmt;

use serde_json::{Map, Value};

/// What to do with slots that passed while no scheduler ran (downtime, a leader change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missed {
    /// Fire the latest missed slot once, late; skip the earlier ones.
    CatchUpOne,
    /// Fire none of them; wait for the next slot.
    Skip,
}

impl std::str::FromStr for Missed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "catch_up_one" => Ok(Self::CatchUpOne),
            "skip" => Ok(Self::Skip),
            other => Err(format!(
                "expected \"catch_up_one\" or \"skip\", got \"{other}\""
            )),
        }
    }
}

/// When a schedule fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum When {
    /// Every this many seconds.
    Every(u64),
    /// A cron expression, evaluated at a fixed UTC offset (seconds east of UTC).
    Cron { expression: Cron, offset_s: i32 },
}

/// A periodic task.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Unique; part of every firing's task id.
    pub name: String,
    pub task: String,
    pub when: When,
    pub kwargs: Map<String, Value>,
    /// The route to send it to, instead of the task's own.
    pub route: Option<String>,
    pub missed: Missed,
    /// Starts this workflow (the body `POST /workflow/start` takes: `workflow` and an optional
    /// `on_failure`) instead of one task; `task`, `kwargs` and `route` are then unused. Each
    /// slot is one workflow, its id fixed by the slot (see [`Schedule::task_id`]).
    pub workflow: Option<Map<String, Value>>,
}

impl Schedule {
    /// The task id of the firing at `slot_ms`.
    pub fn task_id(&self, slot_ms: i64) -> String {
        format!("schedule:{}:{slot_ms}", self.name)
    }

    /// What a firing submits: its task's name, or `workflow`.
    pub fn fires(&self) -> &str {
        if self.workflow.is_some() {
            "workflow"
        } else {
            &self.task
        }
    }

    /// The first slot strictly after `after_ms`.
    pub(crate) fn next_slot(&self, after_ms: i64) -> Option<i64> {
        match &self.when {
            When::Every(period_s) => {
                let period = i64::try_from(*period_s).ok()?.checked_mul(1000)?;
                Some((after_ms.div_euclid(period) + 1) * period)
            }
            When::Cron {
                expression,
                offset_s,
            } => {
                let offset = i64::from(*offset_s);
                let local_s = after_ms.div_euclid(1000) + offset;
                expression
                    .next_after(local_s)
                    .map(|local| (local - offset) * 1000)
            }
        }
    }

    /// The latest slot at or before `now_ms` and after `after_ms`, with how many slots in
    /// between it skips; `None` when no slot passed. Looks at most `limit` slots ahead of
    /// `after_ms` (a cron that fires every minute after a year's downtime).
    pub(crate) fn latest_due(
        &self,
        after_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> Option<(i64, usize)> {
        if let When::Every(period_s) = self.when {
            let period = i64::try_from(period_s).ok()?.checked_mul(1000)?;
            let latest = now_ms.div_euclid(period) * period;
            if latest <= after_ms {
                return None;
            }
            let skipped = ((latest - after_ms - 1) / period) as usize;
            return Some((latest, skipped));
        }
        let mut cursor = after_ms;
        let mut due = None;
        let mut passed = 0usize;
        while let Some(next) = self.next_slot(cursor) {
            if next > now_ms || passed > limit {
                break;
            }
            due = Some(next);
            passed += 1;
            cursor = next;
        }
        due.map(|slot| (slot, passed.saturating_sub(1)))
    }
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Every(s) => write!(f, "every {s} s"),
            Self::Cron {
                expression,
                offset_s,
            } => write!(
                f,
                "cron \"{}\" at {}",
                expression.text,
                offset_text(*offset_s)
            ),
        }
    }
}

/// `UTC` or `+HH:MM` / `-HH:MM`.
pub(crate) fn offset_text(offset_s: i32) -> String {
    if offset_s == 0 {
        return "UTC".into();
    }
    let sign = if offset_s < 0 { '-' } else { '+' };
    let minutes = offset_s.unsigned_abs() / 60;
    format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Reads a timezone: `UTC` (or `Z`) or a fixed offset `+HH:MM` / `-HH:MM`. Zone names with
/// daylight saving time (`Europe/Paris`) are refused: a schedule's slots must not move or repeat
/// when clocks change, so the offset is written out.
pub(crate) fn parse_offset(text: &str) -> Result<i32, String> {
    let refuse = || {
        format!(
            "expected \"UTC\" or a fixed offset such as \"+02:00\" (zone names like \"Europe/Paris\" are not supported: write the offset), got \"{text}\""
        )
    };
    if text.eq_ignore_ascii_case("utc") || text == "Z" {
        return Ok(0);
    }
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err(refuse()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(refuse)?;
    let (h, m): (i32, i32) = (
        h.parse().map_err(|_| refuse())?,
        m.parse().map_err(|_| refuse())?,
    );
    if (0..=14).contains(&h) && (0..60).contains(&m) {
        Ok(sign * (h * 3600 + m * 60))
    } else {
        Err(refuse())
    }
}

/// A five-field cron expression: minute, hour, day of month, month, day of week (0 or 7 is
/// Sunday). Each field is `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`, or a list of
/// these. As in cron, when both day fields are restricted a day matches either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl Cron {
    pub fn parse(text: &str) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "expected five fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        }
        let minutes = bits(fields[0], 0, 59, "minute")?;
        let hours = bits(fields[1], 0, 23, "hour")? as u32;
        let days = bits(fields[2], 1, 31, "day of month")? as u32;
        let months = bits(fields[3], 1, 12, "month")? as u16;
        let mut weekdays = bits(fields[4], 0, 7, "day of week")? as u8;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        Ok(Self {
            text: fields.join(" "),
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_restricted: fields[2] != "*",
            weekdays_restricted: fields[4] != "*",
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn day_matches(&self, day: u32, weekday: u32) -> bool {
        let by_day = self.days & (1 << day) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => by_day || by_weekday,
            _ => by_day && by_weekday,
        }
    }

    /// The first matching minute strictly after `after_s` (seconds on the expression's clock),
    /// within the next eight years; `None` if it never matches (`0 0 31 2 *`).
    pub(crate) fn next_after(&self, after_s: i64) -> Option<i64> {
        let mut minute = after_s.div_euclid(60) + 1;
        let horizon = minute + 8 * 366 * 24 * 60;
        while minute < horizon {
            let days = minute.div_euclid(1440);
            let (_, month, day) = civil_from_days(days);
            let weekday = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday.
            if self.months & (1 << month) == 0 || !self.day_matches(day, weekday) {
                minute = (days + 1) * 1440;
                continue;
            }
            let of_day = minute.rem_euclid(1440);
            let (hour, min) = ((of_day / 60) as u32, (of_day % 60) as u32);
            if self.hours & (1 << hour) == 0 {
                minute = days * 1440 + i64::from(hour + 1) * 60;
                continue;
            }
            if self.minutes & (1 << min) == 0 {
                minute += 1;
                continue;
            }
            return Some(minute * 60);
        }
        None
    }
}

/// The set bits of one field.
fn bits(field: &str, low: u32, high: u32, name: &str) -> Result<u64, String> {
    let mut set = 0u64;
    for part in field.split(',') {
        let bad = |why: &str| format!("{name} field \"{field}\": {why}");
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step.parse().map_err(|_| bad("the step is not a number"))?;
                if step == 0 {
                    return Err(bad("a step of 0"));
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (from, to) = if range == "*" {
            (low, high)
        } else if let Some((a, b)) = range.split_once('-') {
            let a: u32 = a.parse().map_err(|_| bad("not a number"))?;
            let b: u32 = b.parse().map_err(|_| bad("not a number"))?;
            (a, b)
        } else {
            let a: u32 = range.parse().map_err(|_| bad("not a number"))?;
            // `a/n` means from a to the end, as in cron.
            (a, if part.contains('/') { high } else { a })
        };
        if from < low || to > high || from > to {
            return Err(bad(&format!("values must be within {low}-{high}")));
        }
        let mut value = from;
        while value <= to {
            set |= 1 << value;
            value += step;
        }
    }
    Ok(set)
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds since the epoch of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        // Days from civil (the inverse of civil_from_days).
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = i64::from((mo + 9) % 12);
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60
    }

    #[test]
    fn dates_round_trip() {
        for (y, m, d) in [(1970, 1, 1), (2000, 2, 29), (2026, 11, 29), (2100, 12, 31)] {
            assert_eq!(civil_from_days(at(y, m, d, 0, 0) / 86_400), (y, m, d));
        }
    }

    #[test]
    fn cron_finds_the_next_matching_minute() {
        let c = Cron::parse("*/15 9-17 * * 1-5").unwrap();
        // Sunday 2026-11-29 12:00 -> Monday 09:00.
        assert_eq!(
            c.next_after(at(2026, 11, 29, 12, 0)),
            Some(at(2026, 11, 30, 9, 0))
        );
        assert_eq!(
            c.next_after(at(2026, 11, 30, 9, 0)),
            Some(at(2026, 11, 30, 9, 15))
        );
        assert_eq!(
            c.next_after(at(2026, 11, 30, 17, 45)),
            Some(at(2026, 12, 1, 9, 0))
        );
        let midnight_first = Cron::parse("0 0 1 * *").unwrap();
        assert_eq!(
            midnight_first.next_after(at(2026, 12, 15, 0, 0)),
            Some(at(2027, 1, 1, 0, 0))
        );
        let leap = Cron::parse("0 12 29 2 *").unwrap();
        assert_eq!(
            leap.next_after(at(2026, 3, 1, 0, 0)),
            Some(at(2028, 2, 29, 12, 0))
        );
        assert_eq!(Cron::parse("0 0 31 2 *").unwrap().next_after(0), None);
        // Day of month or day of week when both are given; 7 is Sunday.
        let either = Cron::parse("0 0 13 * 7").unwrap();
        assert_eq!(
            either.next_after(at(2026, 11, 28, 0, 0)),
            Some(at(2026, 11, 29, 0, 0))
        );
    }

    #[test]
    fn bad_cron_names_the_field() {
        for (text, field) in [
            ("* * *", "five fields"),
            ("60 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day of week"),
            ("*/0 * * * *", "step of 0"),
            ("a * * * *", "minute"),
        ] {
            let error = Cron::parse(text).unwrap_err();
            assert!(error.contains(field), "{text}: {error}");
        }
    }

    #[test]
    fn offsets_are_explicit() {
        assert_eq!(parse_offset("UTC"), Ok(0));
        assert_eq!(parse_offset("+02:00"), Ok(7200));
        assert_eq!(parse_offset("-05:30"), Ok(-19_800));
        assert!(parse_offset("Europe/Paris").unwrap_err().contains("offset"));
        assert!(parse_offset("+25:00").is_err());
        assert_eq!(offset_text(-19_800), "-05:30");
    }

    fn every(s: u64) -> Schedule {
        Schedule {
            name: "tick".into(),
            task: "t".into(),
            when: When::Every(s),
            kwargs: Map::new(),
            route: None,
            missed: Missed::CatchUpOne,
            workflow: None,
        }
    }

    #[test]
    fn slots_of_every_are_multiples_of_the_period() {
        let s = every(10);
        assert_eq!(s.next_slot(12_345), Some(20_000));
        assert_eq!(s.next_slot(20_000), Some(30_000));
        assert_eq!(s.latest_due(20_000, 29_999, 100), None);
        assert_eq!(s.latest_due(20_000, 30_000, 100), Some((30_000, 0)));
        assert_eq!(s.latest_due(20_000, 75_000, 100), Some((70_000, 4)));
        assert_eq!(s.task_id(70_000), "schedule:tick:70000");
    }

    #[test]
    fn cron_slots_follow_the_offset() {
        let s = Schedule {
            when: When::Cron {
                expression: Cron::parse("0 9 * * *").unwrap(),
                offset_s: 7200,
            },
            ..every(1)
        };
        // 09:00 at +02:00 is 07:00 UTC.
        let after = at(2026, 11, 29, 8, 0) * 1000;
        assert_eq!(s.next_slot(after), Some(at(2026, 11, 30, 7, 0) * 1000));
        let now = at(2026, 12, 2, 8, 0) * 1000;
        assert_eq!(
            s.latest_due(after, now, 100),
            Some((at(2026, 12, 2, 7, 0) * 1000, 2))
        );
    }
}
