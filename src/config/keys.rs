//! Every unknown key of a config file at once, each with its path and the key probably meant.
//!
//! The structs in `file.rs` refuse unknown keys (`deny_unknown_fields`), but serde stops at the
//! first one. A Go agent's ConfigMap may hold several keys the Go agent silently ignored, so
//! before the typed parse the YAML is walked as a plain tree against the keys each struct
//! accepts, every unknown key is reported (`routes[1].htp_port: unknown field `htp_port`; did
//! you mean `http_port`?`) and taken out, and the typed parse then finds the first bad value
//! too.
//!
//! The keys are not listed here: they are read from the structs' own `Deserialize` impls (the
//! field names and aliases serde derives), so a field added to `file.rs` is known at once. Only
//! which keys hold a nested table is written down below ([`table`]), and a unit test checks that
//! against the structs.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_yaml::{Mapping, Value};
use std::fmt;

use super::file::{FileAsync, FileClient, FileConfig, FileDns, FileLedger, FileQueue, FileRoute};
use super::ConfigError;

/// The tables of the file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Top,
    Dns,
    Queue,
    Client,
    Ledger,
    Route,
    Async,
}

/// What a key of a table holds, for the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holds {
    /// A value the typed parse checks.
    Value,
    /// A nested table.
    Table(Table),
    /// A list of tables.
    List(Table),
}

impl Table {
    /// The keys this table accepts (with their aliases), as serde derives them.
    pub(super) fn keys(self) -> &'static [&'static str] {
        match self {
            Table::Top => fields_of::<FileConfig>(),
            Table::Dns => fields_of::<FileDns>(),
            Table::Queue => fields_of::<FileQueue>(),
            Table::Client => fields_of::<FileClient>(),
            Table::Ledger => fields_of::<FileLedger>(),
            Table::Route => fields_of::<FileRoute>(),
            Table::Async => fields_of::<FileAsync>(),
        }
    }

    /// What `key` (one of [`Table::keys`]) holds. A nested struct of `file.rs` must be named
    /// here, or unknown keys inside it are found only one at a time (by the typed parse);
    /// `nested_tables_match_the_structs` checks it.
    pub(super) fn holds(self, key: &str) -> Holds {
        match (self, key) {
            (Table::Top, "dns") => Holds::Table(Table::Dns),
            (Table::Top, "queue") | (Table::Route, "queue") => Holds::Table(Table::Queue),
            (Table::Top, "client") => Holds::Table(Table::Client),
            (Table::Top, "ledger") => Holds::Table(Table::Ledger),
            (Table::Top, "routes") => Holds::List(Table::Route),
            (Table::Route, "async") => Holds::Table(Table::Async),
            _ => Holds::Value,
        }
    }
}

/// Removes every key of `doc` that its table does not accept, and says which, in file order.
/// Values of the wrong shape (a list where a table belongs) are left to the typed parse.
pub(super) fn remove_unknown(doc: &mut Value) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Value::Mapping(map) = doc {
        walk(map, Table::Top, "", &mut errors);
    }
    errors
}

fn walk(map: &mut Mapping, table: Table, path: &str, errors: &mut Vec<ConfigError>) {
    let known = table.keys();
    let at = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    let mut unknown = Vec::new();
    for (key, value) in map.iter_mut() {
        let name = key_name(key);
        if !known.contains(&name.as_str()) {
            errors.push(ConfigError::new(at(&name), unknown_message(&name, known)));
            unknown.push(key.clone());
            continue;
        }
        match (table.holds(&name), value) {
            (Holds::Table(inner), Value::Mapping(m)) => walk(m, inner, &at(&name), errors),
            (Holds::List(inner), Value::Sequence(items)) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let Value::Mapping(m) = item {
                        walk(m, inner, &format!("{}[{i}]", at(&name)), errors);
                    }
                }
            }
            _ => {}
        }
    }
    map.retain(|key, _| !unknown.contains(key));
}

/// A key as the user wrote it: keys are strings, but YAML allows `1:` or `[a]:` too.
fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

fn unknown_message(name: &str, known: &[&str]) -> String {
    match nearest(name, known) {
        Some(meant) => format!("unknown field `{name}`; did you mean `{meant}`?"),
        None => format!(
            "unknown field `{name}` (this level accepts: {})",
            known.join(", ")
        ),
    }
}

/// The known key `name` was probably meant to be: within a small edit distance (one edit for
/// short keys, two otherwise, a swap of two letters counting as one, case ignored), or one
/// being the start of the other (`max_wait`, `service`), the closest first.
fn nearest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    let allowed = if lower.chars().count() <= 4 { 1 } else { 2 };
    let mut best: Option<(usize, &str)> = None;
    for &k in known {
        let kl = k.to_ascii_lowercase();
        let d = edit_distance(&lower, &kl);
        let prefix = {
            let (short, long) = if lower.len() < kl.len() {
                (&lower, &kl)
            } else {
                (&kl, &lower)
            };
            short.len() >= 4 && long.starts_with(short.as_str())
        };
        if (d <= allowed || prefix) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbouring characters each count one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The field names (and aliases) of a struct deriving `Deserialize`: serde hands them to the
/// deserializer in `deserialize_struct`, where this one keeps them and stops.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut probe = FieldsProbe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}

struct FieldsProbe(&'static [&'static str]);

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a struct")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for &mut FieldsProbe {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.0 = fields;
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLES: [Table; 7] = [
        Table::Top,
        Table::Dns,
        Table::Queue,
        Table::Client,
        Table::Ledger,
        Table::Route,
        Table::Async,
    ];

    /// Deserializes `{key: value}` into `table`'s struct.
    fn loads(table: Table, key: &str, value: &str) -> bool {
        let doc = format!("{key}: {value}\n");
        match table {
            Table::Top => serde_yaml::from_str::<FileConfig>(&doc).is_ok(),
            Table::Dns => serde_yaml::from_str::<FileDns>(&doc).is_ok(),
            Table::Queue => serde_yaml::from_str::<FileQueue>(&doc).is_ok(),
            Table::Client => serde_yaml::from_str::<FileClient>(&doc).is_ok(),
            Table::Ledger => serde_yaml::from_str::<FileLedger>(&doc).is_ok(),
            Table::Route => serde_yaml::from_str::<FileRoute>(&doc).is_ok(),
            Table::Async => serde_yaml::from_str::<FileAsync>(&doc).is_ok(),
        }
    }

    #[test]
    fn keys_are_the_structs_fields_and_aliases() {
        assert!(Table::Route.keys().contains(&"K8s_port"));
        assert!(Table::Route.keys().contains(&"k8s_port"));
        assert!(Table::Route.keys().contains(&"match"));
        assert!(Table::Top.keys().contains(&"kube_config_file"));
        for table in TABLES {
            assert!(table.keys().len() >= 2, "{table:?}: {:?}", table.keys());
            for key in table.keys() {
                assert!(!loads(table, &format!("{key}_x"), "~"), "{table:?}");
            }
        }
    }

    /// A key holds a table exactly when an empty table loads there (no leaf of the format
    /// takes `{}`), and a list of tables exactly when `[{}]` does and `{}` does not.
    #[test]
    fn nested_tables_match_the_structs() {
        for table in TABLES {
            for key in table.keys() {
                let want = if loads(table, key, "{}") {
                    "table"
                } else if loads(table, key, "[{}]") {
                    "list"
                } else {
                    "value"
                };
                let got = match table.holds(key) {
                    Holds::Value => "value",
                    Holds::Table(_) => "table",
                    Holds::List(_) => "list",
                };
                assert_eq!(got, want, "{table:?}.{key}");
                // And the nested table is the right one: its keys load inside.
                if let Holds::Table(inner) | Holds::List(inner) = table.holds(key) {
                    for k in inner.keys() {
                        let v = format!("{{{k}: ~}}");
                        let v = if got == "list" { format!("[{v}]") } else { v };
                        assert!(loads(table, key, &v), "{table:?}.{key}.{k}");
                    }
                }
            }
        }
    }

    fn unknown(text: &str) -> (Vec<String>, Value) {
        let mut doc: Value = serde_yaml::from_str(text).unwrap();
        let errors = remove_unknown(&mut doc);
        (errors.iter().map(|e| e.to_string()).collect(), doc)
    }

    #[test]
    fn every_unknown_key_is_named_with_its_path_and_removed() {
        let (errors, doc) = unknown(
            "prot: 1\nport: 8080\ndns: {refresh_intervall: 1s}\nqueue: {timeout: 1s, max_wait: 2}\nroutes:\n  - {uri: /a, limt: 1}\n  - {uri: /b, htp_port: 1, queue: {tmeout: 1s}, zzz: 1}\n",
        );
        assert_eq!(
            errors,
            [
                "prot: unknown field `prot`; did you mean `port`?",
                "dns.refresh_intervall: unknown field `refresh_intervall`; did you mean `refresh_interval`?",
                "queue.max_wait: unknown field `max_wait`; did you mean `max_waiting`?",
                "routes[0].limt: unknown field `limt`; did you mean `limit`?",
                "routes[1].htp_port: unknown field `htp_port`; did you mean `http_port`?",
                "routes[1].queue.tmeout: unknown field `tmeout`; did you mean `timeout`?",
                &format!(
                    "routes[1].zzz: unknown field `zzz` (this level accepts: {})",
                    Table::Route.keys().join(", ")
                ),
            ]
        );
        let clean: Value = serde_yaml::from_str(
            "port: 8080\ndns: {}\nqueue: {timeout: 1s}\nroutes:\n  - {uri: /a}\n  - {uri: /b, queue: {}}\n",
        )
        .unwrap();
        assert_eq!(doc, clean);
    }

    #[test]
    fn odd_shapes_are_left_to_the_typed_parse() {
        let (errors, _) = unknown("routes: {uri: /a}\ndns: [1]\n1: x\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("1: unknown field `1`"), "{errors:?}");
        assert!(unknown("[1, 2]").0.is_empty());
        assert!(unknown("~").0.is_empty());
    }

    #[test]
    fn suggestions_are_near_misses_only() {
        let known = Table::Top.keys();
        assert_eq!(nearest("Debug", known), Some("debug"));
        assert_eq!(nearest("lisen", known), Some("listen"));
        assert_eq!(nearest("threds", known), Some("threads"));
        assert_eq!(nearest("shutdown", known), Some("shutdown_grace"));
        assert_eq!(nearest("route", known), Some("routes"));
        assert_eq!(nearest("cluster", known), Some("cluster_domain"));
        assert_eq!(nearest("xyz", known), None);
        assert_eq!(nearest("dbg", known), None);
        assert_eq!(edit_distance("prot", "port"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
