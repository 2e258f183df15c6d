//! The queue page's throughput chart: completed and failed tasks per minute over the last
//! hour, as an inline SVG (no script, no external file).

use chrono::{DateTime, DurationRound as _, Utc};
use maud::{Markup, html};

use crate::store::MinuteCount;

/// Minutes the chart shows, the newest at the right.
pub const MINUTES: usize = 60;
const WIDTH: usize = 240;
const HEIGHT: usize = 40;

/// Completed and failed per minute for `queue`, oldest first, the last being `now`'s minute.
pub fn per_minute(queue: &str, counts: &[MinuteCount], now: DateTime<Utc>) -> Vec<(u64, u64)> {
    let this_minute = now
        .duration_trunc(chrono::Duration::minutes(1))
        .unwrap_or(now);
    let first = this_minute - chrono::Duration::minutes(MINUTES as i64 - 1);
    let mut slots = vec![(0, 0); MINUTES];
    for count in counts.iter().filter(|count| count.queue == queue) {
        let offset = (count.minute - first).num_minutes();
        if let Some(slot) = usize::try_from(offset)
            .ok()
            .and_then(|offset| slots.get_mut(offset))
        {
            slot.0 += count.completed;
            slot.1 += count.failed;
        }
    }
    slots
}

/// Two polylines (completed, failed) scaled to the busiest minute, with the totals as the
/// chart's accessible label.
pub fn throughput(queue: &str, counts: &[MinuteCount], now: DateTime<Utc>) -> Markup {
    let slots = per_minute(queue, counts, now);
    let peak = slots
        .iter()
        .map(|(completed, failed)| (*completed).max(*failed))
        .max()
        .unwrap_or(0)
        .max(1);
    let completed: u64 = slots.iter().map(|slot| slot.0).sum();
    let failed: u64 = slots.iter().map(|slot| slot.1).sum();
    let label = format!("last hour: {completed} completed, {failed} failed (peak {peak}/min)");
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
            viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(label)
            data-completed=(completed) data-failed=(failed) {
            title { (label) }
            polyline.completed points=(points(slots.iter().map(|slot| slot.0), peak)) {}
            polyline.failed points=(points(slots.iter().map(|slot| slot.1), peak)) {}
        }
    }
}

fn points(values: impl Iterator<Item = u64>, peak: u64) -> String {
    let step = WIDTH as f64 / (MINUTES - 1) as f64;
    values
        .enumerate()
        .map(|(index, value)| {
            let x = index as f64 * step;
            let y = HEIGHT as f64 - 2.0 - (value as f64 / peak as f64) * (HEIGHT as f64 - 4.0);
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(queue: &str, minute: DateTime<Utc>, completed: u64, failed: u64) -> MinuteCount {
        MinuteCount {
            queue: queue.into(),
            minute,
            completed,
            failed,
        }
    }

    #[test]
    fn minutes_land_in_their_slot_and_other_queues_and_old_minutes_are_left_out() {
        let now = DateTime::parse_from_rfc3339("2026-11-30T12:30:45Z")
            .unwrap()
            .with_timezone(&Utc);
        let minute = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc)
        };
        let counts = [
            count("q", minute("2026-11-30T12:30:00Z"), 5, 1),
            count("q", minute("2026-11-30T11:31:00Z"), 2, 0),
            count("q", minute("2026-11-30T11:30:00Z"), 9, 9),
            count("other", minute("2026-11-30T12:30:00Z"), 7, 7),
        ];
        let slots = per_minute("q", &counts, now);
        assert_eq!(slots.len(), MINUTES);
        assert_eq!(slots[MINUTES - 1], (5, 1));
        assert_eq!(slots[0], (2, 0));
        assert_eq!(slots.iter().map(|slot| slot.0).sum::<u64>(), 7);
        let svg = throughput("q", &counts, now).into_string();
        assert!(svg.contains("data-completed=\"7\"") && svg.contains("data-failed=\"1\""));
    }
}
