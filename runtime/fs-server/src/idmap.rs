//! File owner translation between host and guest ids, as virtiofsd 1.14's `--translate-uid` /
//! `--translate-gid` (its `soft_idmap`) does for the two rule kinds the daemon gives:
//! - `map:<guest>:<host>:<count>`: guest ids `guest..guest+count` are host ids
//!   `host..host+count`, both ways;
//! - `squash-host:<host>:<guest>:<count>`: host ids `host..host+count` all appear in the guest
//!   as `guest` (one way only).
//!
//! Each direction is its own table; an id in no range of a direction passes through unchanged
//! (virtiofsd's default: there is no overflow id for unmapped ids). Two rules whose ranges
//! overlap in one direction are refused, as virtiofsd refuses them, and so are empty and
//! overflowing ranges.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdMapError {
    #[error("id translation {0:?}: expected map:<guest>:<host>:<count> or squash-host:<host>:<guest>:<count>")]
    Syntax(String),
    #[error("id translation {0:?}: the range is empty or runs past id 4294967295")]
    Range(String),
    #[error("id translation {rule} overlaps {earlier} on the {side} side")]
    Overlap { rule: String, earlier: String, side: &'static str },
}

/// One `--translate-uid` / `--translate-gid` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdRule {
    Map { guest: u32, host: u32, count: u32 },
    SquashHost { host: u32, guest: u32, count: u32 },
}

impl fmt::Display for IdRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Map { guest, host, count } => write!(f, "map:{guest}:{host}:{count}"),
            Self::SquashHost { host, guest, count } => {
                write!(f, "squash-host:{host}:{guest}:{count}")
            }
        }
    }
}

impl FromStr for IdRule {
    type Err = IdMapError;

    fn from_str(s: &str) -> Result<Self, IdMapError> {
        let syntax = || IdMapError::Syntax(s.to_string());
        let mut parts = s.split(':');
        let kind = parts.next().ok_or_else(syntax)?;
        let numbers: Vec<u32> =
            parts.map(|p| p.parse::<u32>().map_err(|_| syntax())).collect::<Result<_, _>>()?;
        let [a, b, count] = numbers[..] else { return Err(syntax()) };
        let rule = match kind {
            "map" => Self::Map { guest: a, host: b, count },
            "squash-host" => Self::SquashHost { host: a, guest: b, count },
            _ => return Err(syntax()),
        };
        let fits = |start: u32| count > 0 && start.checked_add(count - 1).is_some();
        let ok = match rule {
            Self::Map { guest, host, .. } => fits(guest) && fits(host),
            Self::SquashHost { host, .. } => fits(host),
        };
        if !ok {
            return Err(IdMapError::Range(s.to_string()));
        }
        Ok(rule)
    }
}

/// One range of one direction: ids `from..from+count` go to `to` (+ the offset unless
/// `squash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    from: u32,
    count: u32,
    to: u32,
    squash: bool,
    rule: IdRule,
}

impl Span {
    fn get(&self, id: u32) -> Option<u32> {
        let offset = id.checked_sub(self.from).filter(|&o| o < self.count)?;
        Some(if self.squash { self.to } else { self.to + offset })
    }

    fn overlaps(&self, other: &Span) -> bool {
        let end = |s: &Span| u64::from(s.from) + u64::from(s.count);
        u64::from(self.from) < end(other) && u64::from(other.from) < end(self)
    }
}

/// The translation of one id kind (uids or gids); empty: every id as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    to_host: Vec<Span>,
    to_guest: Vec<Span>,
}

impl IdMap {
    /// The map of `rules`, refused if two ranges overlap in one direction.
    pub fn new(rules: &[IdRule]) -> Result<Self, IdMapError> {
        let mut map = IdMap::default();
        for &rule in rules {
            match rule {
                IdRule::Map { guest, host, count } => {
                    let to_host = Span { from: guest, count, to: host, squash: false, rule };
                    push(&mut map.to_host, to_host, "guest")?;
                    let to_guest = Span { from: host, count, to: guest, squash: false, rule };
                    push(&mut map.to_guest, to_guest, "host")?;
                }
                IdRule::SquashHost { host, guest, count } => {
                    let to_guest = Span { from: host, count, to: guest, squash: true, rule };
                    push(&mut map.to_guest, to_guest, "host")?;
                }
            }
        }
        Ok(map)
    }

    /// Parses and checks `--translate-*` values.
    pub fn parse(rules: &[String]) -> Result<Self, IdMapError> {
        let rules: Vec<IdRule> = rules.iter().map(|r| r.parse()).collect::<Result<_, _>>()?;
        Self::new(&rules)
    }

    pub fn is_identity(&self) -> bool {
        self.to_host.is_empty() && self.to_guest.is_empty()
    }

    /// The host id a guest id stands for (a caller's, a chown's).
    pub fn host(&self, guest: u32) -> u32 {
        self.to_host.iter().find_map(|s| s.get(guest)).unwrap_or(guest)
    }

    /// The id a host file's owner appears as in the guest.
    pub fn guest(&self, host: u32) -> u32 {
        self.to_guest.iter().find_map(|s| s.get(host)).unwrap_or(host)
    }
}

fn push(spans: &mut Vec<Span>, span: Span, side: &'static str) -> Result<(), IdMapError> {
    if let Some(earlier) = spans.iter().find(|s| s.overlaps(&span)) {
        return Err(IdMapError::Overlap {
            rule: span.rule.to_string(),
            earlier: earlier.rule.to_string(),
            side,
        });
    }
    spans.push(span);
    Ok(())
}

/// A share's uid and gid translations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMaps {
    pub uids: IdMap,
    pub gids: IdMap,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rules: &[&str]) -> Result<IdMap, IdMapError> {
        IdMap::parse(&rules.iter().map(|r| r.to_string()).collect::<Vec<_>>())
    }

    /// The daemon's translation of a pod mapping container 0.. to guest 131072.. (65536 ids).
    #[test]
    fn a_pods_translation_goes_both_ways_and_squashes_the_guest_range() {
        let m = map(&["map:131072:0:65536", "squash-host:131072:65534:65536"]).unwrap();
        // Guest → host: the container's ids (as guest ids) are the host's container ids.
        assert_eq!((m.host(131_072), m.host(132_072), m.host(196_607)), (0, 1000, 65_535));
        // Guest ids outside the map pass (the guest's own root is the host's root).
        assert_eq!((m.host(0), m.host(196_608), m.host(65_534)), (0, 196_608, 65_534));
        // Host → guest: host ids of the container range show as the mapped guest ids, the
        // guest range itself as nobody, everything else as it is.
        assert_eq!((m.guest(0), m.guest(1000), m.guest(65_535)), (131_072, 132_072, 196_607));
        assert_eq!((m.guest(131_072), m.guest(196_607)), (65_534, 65_534));
        assert_eq!((m.guest(196_608), m.guest(u32::MAX)), (196_608, u32::MAX));
        assert!(IdMap::default().is_identity() && !m.is_identity());
        assert_eq!(IdMap::default().guest(7), 7);
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_named() {
        for bad in ["map:1:2", "map:1:2:3:4", "guest:1:2:3", "map:a:2:3", "map:-1:2:3", ""] {
            assert!(matches!(map(&[bad]), Err(IdMapError::Syntax(_))), "{bad}");
        }
        for bad in ["map:0:0:0", "map:4294967295:0:2", "squash-host:4294967000:0:1000"] {
            assert!(matches!(map(&[bad]), Err(IdMapError::Range(_))), "{bad}");
        }
        assert!(map(&["map:4294967295:0:1"]).is_ok());
        let err = map(&["map:100:0:10", "map:105:50:10"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "id translation map:105:50:10 overlaps map:100:0:10 on the guest side"
        );
        assert!(map(&["map:100:0:10", "map:200:5:10"]).is_err(), "host sides overlap");
        assert!(map(&["map:100:0:10", "squash-host:5:65534:10"]).is_err());
        // A squash only takes the host → guest direction.
        assert!(map(&["map:100:0:10", "squash-host:100:65534:10"]).is_ok());
    }
}
