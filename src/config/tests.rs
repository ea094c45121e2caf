//! Parsing and validation of settings, as the binary sees them.

use super::*;

fn parse(args: &[&str]) -> Result<Config, ConfigError> {
    let mut argv = vec!["pgfanout"];
    argv.extend_from_slice(args);
    Config::try_parse_from(argv).expect("parses").validate()
}

#[test]
fn defaults_are_valid_and_fill_the_node_id() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.listen.port(), 8000);
    assert_eq!(c.max_frame_bytes, 65536);
    assert!(!c.allow_anonymous, "anonymous access is opt-in");
    assert_eq!(c.anonymous_channels, vec!["*"]);
    assert!(c.key_sources().is_empty());
    assert!(c.node_id().contains('-'));
}

#[test]
fn errors_name_the_setting() {
    let e = parse(&["--max-frame-bytes", "10"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_MAX_FRAME_BYTES"), "{e}");
    let e = parse(&["--channels", "orders"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_DATABASE_URL"), "{e}");
    let e = parse(&[
        "--channels",
        "bad name",
        "--database-url",
        "postgres://x@localhost/db",
    ])
    .unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_CHANNELS"), "{e}");
    let e = parse(&["--redis-url", "nonsense://"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_REDIS_URL"), "{e}");
}

#[test]
fn history_rules_are_parsed_and_checked() {
    let c = parse(&[
        "--history-channels",
        "chat:*=100/1m,ticks:*=0",
        "--recovery-max-publications",
        "50",
    ])
    .unwrap();
    let policy = c.history_policy();
    assert_eq!(policy.for_channel("chat:1").size, 100);
    assert!(!policy.for_channel("ticks:eu").enabled());
    assert_eq!(policy.for_channel("orders").size, 1000);
    assert_eq!(policy.recovery_max, 50);
    let e = parse(&["--history-channels", "a=1/48h"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_HISTORY_META_TTL"), "{e}");
    let e = parse(&["--history-channels", "a=2000000"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_HISTORY_CHANNELS"), "{e}");
    let e = parse(&["--recovery-max-publications", "0"]).unwrap_err();
    assert!(
        e.to_string().contains("PGFANOUT_RECOVERY_MAX_PUBLICATIONS"),
        "{e}"
    );
    let e = parse(&["--history-channels", "nonsense"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_HISTORY_CHANNELS"), "{e}");
    assert!(parse(&["--history-channels", ""])
        .unwrap()
        .history_rules
        .is_empty());
}

#[test]
fn channels_are_split_and_trimmed() {
    let c = parse(&[
        "--channels",
        "orders, events,",
        "--database-url",
        "postgres://x@localhost/db",
    ])
    .unwrap();
    assert_eq!(c.channels, vec!["orders", "events"]);
}

#[test]
fn a_redis_cluster_is_named_by_its_seed_urls() {
    let c = parse(&[
        "--redis-cluster",
        "true",
        "--redis-url",
        "redis://a:7000, redis://b:7001",
    ])
    .unwrap();
    assert!(c.redis_cluster);
    let e = parse(&["--redis-cluster", "true"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_REDIS_CLUSTER"), "{e}");
    let e = parse(&["--redis-cluster", "true", "--redis-url", " , "]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_REDIS_URL"), "{e}");
    let e = parse(&["--redis-cluster", "true", "--redis-url", "redis://a:1,nope"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_REDIS_URL"), "{e}");
    // Without the flag a comma is just part of one (invalid) URL.
    assert!(parse(&["--redis-url", "redis://a:1,redis://b:2"]).is_err());
}

#[test]
fn the_demo_is_off_by_default_and_needs_a_database() {
    let c = parse(&[]).unwrap();
    assert!(!c.demo);
    let e = parse(&["--demo", "true"]).unwrap_err();
    assert!(e.to_string().contains("PGFANOUT_DATABASE_URL"), "{e}");
}

#[test]
fn the_demo_needs_a_way_for_its_page_to_connect() {
    let db = "postgres://x@localhost/db";
    let e = parse(&["--demo", "true", "--database-url", db]).unwrap_err();
    assert!(
        e.to_string().contains("PGFANOUT_TOKEN_HMAC_SECRET_KEY"),
        "{e}"
    );
    let only_public = [
        "--demo",
        "true",
        "--database-url",
        db,
        "--allow-anonymous",
        "true",
        "--anonymous-channels",
        "public.*",
    ];
    assert!(parse(&only_public).is_err());
    let secret = "0123456789abcdef0123";
    let signed = [
        "--demo",
        "true",
        "--database-url",
        db,
        "--token-hmac-secret-key",
        secret,
    ];
    assert!(parse(&signed).is_ok());
    let open = [
        "--demo",
        "true",
        "--database-url",
        db,
        "--allow-anonymous",
        "true",
    ];
    assert!(parse(&open).is_ok());
}

#[test]
fn the_demo_listens_on_its_channel_once() {
    let db = "postgres://x@localhost/db";
    let c = parse(&[
        "--demo",
        "true",
        "--database-url",
        db,
        "--allow-anonymous",
        "true",
        "--channels",
        "orders",
    ])
    .unwrap();
    assert_eq!(c.channels, vec!["orders", crate::demo::CHANNEL]);
    let both = format!("orders,{}", crate::demo::CHANNEL);
    let c = parse(&[
        "--demo",
        "true",
        "--database-url",
        db,
        "--allow-anonymous",
        "true",
        "--channels",
        &both,
    ])
    .unwrap();
    assert_eq!(c.channels, vec!["orders", crate::demo::CHANNEL]);
}
