//! Reading one variable each: [`Reader`] looks a variable up (falling back to its default in
//! [`VARIABLES`](super::VARIABLES)) and parses it, so every setting names its variable once and
//! every error names the variable it came from.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use super::{default_of, redact_url, ConfigError, RetryOverrides, ServiceUrl};

/// Looks variables up through a function (the environment, or a map in tests).
pub(super) struct Reader<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    pub(super) fn new(lookup: F) -> Self {
        Self { lookup }
    }

    /// The trimmed value, when set and not empty.
    pub(super) fn optional(&self, var: &str) -> Option<String> {
        (self.lookup)(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// A comma-separated list of networks (`10.0.0.0/8, 127.0.0.1`); empty when unset.
    pub(super) fn networks(
        &self,
        var: &'static str,
    ) -> Result<Vec<crate::domain::network::Network>, ConfigError> {
        let value = self.value(var);
        value
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                crate::domain::network::Network::parse(part).ok_or_else(|| ConfigError {
                    var,
                    reason: format!("`{part}` is not an address or a network (10.0.0.0/8, ::1)"),
                })
            })
            .collect()
    }

    /// The value, or the variable's default.
    pub(super) fn value(&self, var: &'static str) -> String {
        self.optional(var)
            .unwrap_or_else(|| default_of(var).to_owned())
    }

    /// A value whose type says how it parses; the parse error becomes the reason.
    pub(super) fn parsed<T: FromStr<Err = String>>(
        &self,
        var: &'static str,
    ) -> Result<T, ConfigError> {
        self.value(var)
            .parse()
            .map_err(|reason| ConfigError { var, reason })
    }

    /// A whole number within `range`, `what` naming its unit in the error.
    pub(super) fn number<T>(
        &self,
        var: &'static str,
        range: RangeInclusive<T>,
        what: &str,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Display,
    {
        self.value(var)
            .parse::<T>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| ConfigError {
                var,
                reason: format!(
                    "expected {what} between {} and {}",
                    range.start(),
                    range.end()
                ),
            })
    }

    pub(super) fn url(
        &self,
        var: &'static str,
        schemes: &[&str],
    ) -> Result<ServiceUrl, ConfigError> {
        url_setting(var, &self.value(var), schemes)
    }

    /// A URL that may be left unset (`None`).
    pub(super) fn optional_url(
        &self,
        var: &'static str,
        schemes: &[&str],
    ) -> Result<Option<ServiceUrl>, ConfigError> {
        self.optional(var)
            .map(|value| url_setting(var, &value, schemes))
            .transpose()
    }

    pub(super) fn name(&self, var: &'static str) -> Result<String, ConfigError> {
        name_setting(var, &self.value(var))
    }

    pub(super) fn millis(&self, var: &'static str) -> Result<Duration, ConfigError> {
        duration_ms(var, &self.value(var))
    }

    /// Milliseconds where 0 means "none" (rather than a mistake).
    pub(super) fn millis_or_zero(&self, var: &'static str) -> Result<Duration, ConfigError> {
        match self.value(var).as_str() {
            "0" => Ok(Duration::ZERO),
            value => duration_ms(var, value),
        }
    }

    pub(super) fn seconds(&self, var: &'static str) -> Result<Duration, ConfigError> {
        duration_secs(var, &self.value(var))
    }

    pub(super) fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
        bool_setting(var, &self.value(var))
    }

    /// An optional override: `None` when unset, parsed by `parse` when set.
    pub(super) fn maybe<T>(
        &self,
        var: &'static str,
        parse: fn(&'static str, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        self.optional(var).map(|v| parse(var, &v)).transpose()
    }
}

fn url_setting(
    var: &'static str,
    value: &str,
    schemes: &[&str],
) -> Result<ServiceUrl, ConfigError> {
    // Several URLs (a cluster's nodes, comma-separated) must each have a scheme given; a
    // MongoDB seed list (`mongodb://h1,h2`) has one scheme and is one URL.
    let parts: Vec<&str> = if value.matches("://").count() > 1 {
        value.split(',').map(str::trim).collect()
    } else {
        vec![value]
    };
    let fits = |part: &&str| {
        part.contains("://") && schemes.contains(&part.split("://").next().unwrap_or_default())
    };
    if !parts.iter().all(fits) {
        return Err(ConfigError {
            var,
            reason: format!(
                "expected a URL starting with {} (got `{}`)",
                schemes
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                redact_url(value)
            ),
        });
    }
    Ok(ServiceUrl::new(value))
}

/// Names end up in queue names, database names and Redis keys: keep them to a safe alphabet.
fn name_setting(var: &'static str, value: &str) -> Result<String, ConfigError> {
    crate::domain::check_safe_name(value)
        .map(|()| value.to_owned())
        .map_err(|reason| ConfigError { var, reason })
}

pub(super) fn duration_ms(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(ConfigError {
            var,
            reason: format!("expected a positive number of milliseconds, got `{value}`"),
        }),
    }
}

fn duration_secs(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(ConfigError {
            var,
            reason: format!("expected a number of seconds, got `{value}`"),
        }),
    }
}

fn bool_setting(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(ConfigError {
            var,
            reason: format!("expected true or false, got `{other}`"),
        }),
    }
}

pub(super) fn parse_retries(var: &'static str, value: &str) -> Result<u32, ConfigError> {
    value.parse::<u32>().map_err(|_| ConfigError {
        var,
        reason: format!("expected a non-negative integer, got `{value}`"),
    })
}

pub(super) fn parse_factor(var: &'static str, value: &str) -> Result<f64, ConfigError> {
    match value.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 1.0 => Ok(f),
        _ => Err(ConfigError {
            var,
            reason: format!("expected a number of at least 1, got `{value}`"),
        }),
    }
}

/// `task:max=5,base_ms=100,factor=2,cap_ms=2000;other:max=0` → per-task overrides.
pub(super) fn parse_task_retry(
    value: &str,
) -> Result<BTreeMap<String, RetryOverrides>, ConfigError> {
    const VAR: &str = "KOBE_TASK_RETRY";
    let mut policies = BTreeMap::new();
    for entry in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (task, settings) = entry.split_once(':').ok_or_else(|| ConfigError {
            var: VAR,
            reason: format!("`{entry}` is not `task:key=value,…`"),
        })?;
        let mut o = RetryOverrides::default();
        for pair in settings.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, v) = pair.split_once('=').ok_or_else(|| ConfigError {
                var: VAR,
                reason: format!("`{pair}` is not `key=value`"),
            })?;
            match key.trim() {
                "max" => o.max_retries = Some(parse_retries(VAR, v.trim())?),
                "base_ms" => o.base_delay = Some(duration_ms(VAR, v.trim())?),
                "factor" => o.factor = Some(parse_factor(VAR, v.trim())?),
                "cap_ms" => o.max_delay = Some(duration_ms(VAR, v.trim())?),
                other => {
                    return Err(ConfigError {
                        var: VAR,
                        reason: format!("unknown key `{other}` (max, base_ms, factor, cap_ms)"),
                    })
                }
            }
        }
        policies.insert(task.trim().to_owned(), o);
    }
    Ok(policies)
}

/// `task=route,task2=route2` → map. Routes become queue names, so they use the name alphabet.
pub(super) fn parse_routes(value: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    const VAR: &str = "KOBE_TASK_ROUTES";
    let mut routes = BTreeMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (task, route) = pair.split_once('=').ok_or_else(|| ConfigError {
            var: VAR,
            reason: format!("`{pair}` is not `task_name=route`"),
        })?;
        let route = name_setting(VAR, route.trim())?;
        routes.insert(task.trim().to_owned(), route);
    }
    Ok(routes)
}
