//! Token verification against real keys (tests/fixtures/keys, test-only key pairs).

use std::path::PathBuf;
use std::sync::Arc;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const SECRET: &str = "test-secret";
const NOW: u64 = 1_800_000_000;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

fn sources() -> KeySources {
    KeySources {
        hmac_secret: Some(SECRET.into()),
        rsa_public_key: Some(fixture("rsa_public.pem").display().to_string()),
        ecdsa_public_key: Some(String::from_utf8(read("ec_public.pem")).expect("utf8")),
        jwks_file: None,
    }
}

fn auth_with(sources: &KeySources, rules: TokenRules) -> Authenticator {
    Authenticator::new(Arc::new(KeyStore::load(sources).expect("keys load")), rules)
}

fn auth() -> Authenticator {
    auth_with(&sources(), TokenRules::default())
}

fn sign(alg: Algorithm, claims: &Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&read("rsa_private.pem")).expect("rsa"),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&read("ec_private.pem")).expect("ec"),
        other => panic!("no test key for {other:?}"),
    };
    encode(&Header::new(alg), claims, &key).expect("sign")
}

fn claims() -> Value {
    json!({"sub": "42", "exp": NOW + 60, "iat": NOW, "channels": ["user:{sub}", "orders.*"],
           "publish": ["chat"], "tier": "pro", "tenant": "acme"})
}

#[test]
fn valid_tokens_of_each_algorithm_verify() {
    let auth = auth();
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
        let id = auth
            .verify_connect(&sign(alg, &claims()), NOW)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(&*id.user, "42");
        assert_eq!(id.expires_at, NOW + 60);
        assert_eq!(id.tier.as_deref(), Some("pro"));
        assert!(id.channels.allows("user:42") && id.channels.allows("orders.eu"));
        assert!(!id.channels.allows("user:43") && !id.channels.allows("chat"));
        assert!(id.publish.allows("chat") && !id.publish.allows("orders.eu"));
    }
}

#[test]
fn expired_tokens_are_told_apart_but_only_when_genuine() {
    let auth = auth();
    let mut c = claims();
    c["exp"] = json!(NOW);
    assert_eq!(
        auth.verify_connect(&sign(Algorithm::HS256, &c), NOW)
            .unwrap_err(),
        AuthError::Expired
    );
    // An expired token with a bad signature is a bad token, not an expired one.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(b"other"),
    )
    .expect("sign");
    assert_eq!(
        auth.verify_connect(&forged, NOW).unwrap_err(),
        AuthError::Signature
    );
}

#[test]
fn wrong_signatures_and_keys_are_refused() {
    let auth = auth();
    let other_rsa = EncodingKey::from_rsa_pem(&read("rsa_other_private.pem")).expect("rsa");
    let token = encode(&Header::new(Algorithm::RS256), &claims(), &other_rsa).expect("sign");
    assert_eq!(
        auth.verify_connect(&token, NOW).unwrap_err(),
        AuthError::Signature
    );
    // A token whose payload was edited after signing.
    let good = sign(Algorithm::HS256, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"sub": "admin", "exp": NOW + 60, "channels": ["*"]}).to_string());
    let edited = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert_eq!(
        auth.verify_connect(&edited, NOW).unwrap_err(),
        AuthError::Signature
    );
}

#[test]
fn algorithm_none_and_hs_rs_confusion_are_refused() {
    let auth = auth();
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims())
    );
    assert!(matches!(
        auth.verify_connect(&none, NOW),
        Err(AuthError::Algorithm(_))
    ));
    // HS256 signed with the RSA public key as the secret: the classic confusion attack.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&read("rsa_public.pem")),
    )
    .expect("sign");
    assert_eq!(
        auth.verify_connect(&confused, NOW).unwrap_err(),
        AuthError::Signature
    );
    // With no HMAC secret configured, an HS256 token has no key at all.
    let rsa_only = auth_with(
        &KeySources {
            hmac_secret: None,
            ..sources()
        },
        TokenRules::default(),
    );
    assert!(matches!(
        rsa_only.verify_connect(&confused, NOW),
        Err(AuthError::NoKey(_))
    ));
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    assert!(matches!(
        auth.verify_connect(&hs512, NOW),
        Err(AuthError::Algorithm(_))
    ));
    assert!(matches!(
        auth.verify_connect("not a token", NOW),
        Err(AuthError::Malformed(_))
    ));
}

#[test]
fn missing_or_misused_claims_are_refused() {
    let auth = auth();
    for drop in ["sub", "exp"] {
        let mut c = claims();
        c.as_object_mut().expect("object").remove(drop);
        let e = auth
            .verify_connect(&sign(Algorithm::HS256, &c), NOW)
            .unwrap_err();
        assert!(matches!(e, AuthError::Claims(_)), "{drop}: {e}");
    }
    let mut c = claims();
    c["sub"] = json!("");
    assert!(matches!(
        auth.verify_connect(&sign(Algorithm::HS256, &c), NOW),
        Err(AuthError::Claims(_))
    ));
    let mut c = claims();
    c["iat"] = json!(NOW + 3600);
    assert!(matches!(
        auth.verify_connect(&sign(Algorithm::HS256, &c), NOW),
        Err(AuthError::Claims(_))
    ));
    let mut c = claims();
    c["channels"] = json!("orders");
    assert!(matches!(
        auth.verify_connect(&sign(Algorithm::HS256, &c), NOW),
        Err(AuthError::Claims(_))
    ));
    // A subscription token cannot connect.
    let mut c = claims();
    c["channel"] = json!("orders.eu");
    assert!(matches!(
        auth.verify_connect(&sign(Algorithm::HS256, &c), NOW),
        Err(AuthError::Claims(_))
    ));
}

#[test]
fn subscription_tokens_grant_their_one_channel_to_their_one_user() {
    let auth = auth();
    let token = sign(
        Algorithm::HS256,
        &json!({"sub": "42", "exp": NOW + 30, "channel": "secret"}),
    );
    assert_eq!(
        auth.verify_subscription(&token, "42", "secret", NOW),
        Ok(Grant {
            expires_at: NOW + 30
        })
    );
    assert!(auth
        .verify_subscription(&token, "43", "secret", NOW)
        .is_err());
    assert!(auth
        .verify_subscription(&token, "42", "other", NOW)
        .is_err());
    assert_eq!(
        auth.verify_subscription(&token, "42", "secret", NOW + 30),
        Err(AuthError::Expired)
    );
    // A connection token is no subscription token.
    let connect = sign(Algorithm::HS256, &claims());
    assert!(auth
        .verify_subscription(&connect, "42", "orders.eu", NOW)
        .is_err());
}

#[test]
fn audience_issuer_and_subject_claim_rules() {
    let rules = TokenRules {
        audience: Some("pgfanout".into()),
        issuer: Some("https://idp".into()),
        subject_claim: Some("tenant".into()),
    };
    let auth = auth_with(&sources(), rules);
    let mut c = claims();
    c["aud"] = json!("pgfanout");
    c["iss"] = json!("https://idp");
    let id = auth
        .verify_connect(&sign(Algorithm::HS256, &c), NOW)
        .expect("valid");
    assert_eq!(id.subject_claim.as_deref(), Some("acme"));
    c["aud"] = json!("other");
    assert!(auth
        .verify_connect(&sign(Algorithm::HS256, &c), NOW)
        .is_err());
    c["aud"] = json!("pgfanout");
    c["iss"] = json!("https://evil");
    assert!(auth
        .verify_connect(&sign(Algorithm::HS256, &c), NOW)
        .is_err());
    c.as_object_mut().expect("object").remove("iss");
    assert!(auth
        .verify_connect(&sign(Algorithm::HS256, &c), NOW)
        .is_err());
}

#[test]
fn jwks_keys_are_chosen_by_kid_and_reloaded_when_the_file_changes() {
    let dir = std::env::temp_dir().join(format!("pgfanout-jwks-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("jwks.json");
    std::fs::copy(fixture("jwks_k1.json"), &path).expect("copy");
    let store = Arc::new(
        KeyStore::load(&KeySources {
            jwks_file: Some(path.clone()),
            ..KeySources::default()
        })
        .expect("jwks loads"),
    );
    let auth = Authenticator::new(store.clone(), TokenRules::default());
    let signed = |private: &str, kid: &str| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        encode(
            &header,
            &claims(),
            &EncodingKey::from_rsa_pem(&read(private)).expect("rsa"),
        )
        .expect("sign")
    };
    assert!(auth
        .verify_connect(&signed("rsa_private.pem", "k1"), NOW)
        .is_ok());
    assert!(auth
        .verify_connect(&signed("rsa_other_private.pem", "k2"), NOW)
        .is_err());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let watcher = tokio::spawn(store.clone().watch_jwks(cancel.clone()));
        // Make sure the modification time differs even on coarse file systems.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        std::fs::copy(fixture("jwks_k2.json"), &path).expect("rotate");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while auth
            .verify_connect(&signed("rsa_other_private.pem", "k2"), NOW)
            .is_err()
        {
            assert!(tokio::time::Instant::now() < deadline, "JWKS not reloaded");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // The old key is gone with the old file.
        assert!(auth
            .verify_connect(&signed("rsa_private.pem", "k1"), NOW)
            .is_err());
        // A broken file keeps the keys we have.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        std::fs::write(&path, "{not json").expect("break");
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        assert!(auth
            .verify_connect(&signed("rsa_other_private.pem", "k2"), NOW)
            .is_ok());
        cancel.cancel();
        let _ = watcher.await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn policy_combines_token_patterns_with_anonymous_ones() {
    let auth = auth();
    let id = auth
        .verify_connect(&sign(Algorithm::HS256, &claims()), NOW)
        .expect("valid");
    let policy = Policy {
        allow_anonymous: true,
        anonymous_channels: Patterns::compile(&["public.*"], None),
        allow_anonymous_publish: false,
        anonymous_publish_channels: Patterns::compile(&["*"], None),
        allowed_origins: Patterns::compile(
            &["https://app.example.com", "https://*.example.org"],
            None,
        ),
        expiry_grace: std::time::Duration::from_secs(25),
    };
    assert!(policy.may_subscribe(None, "public.news"));
    assert!(!policy.may_subscribe(None, "orders.eu"));
    assert!(policy.may_subscribe(Some(&id), "orders.eu"));
    assert!(policy.may_subscribe(Some(&id), "public.news"));
    assert!(!policy.may_publish(None, "chat"));
    assert!(policy.may_publish(Some(&id), "chat"));
    assert!(policy.origin_allowed(None));
    assert!(policy.origin_allowed(Some("https://app.example.com")));
    assert!(policy.origin_allowed(Some("https://eu.example.org")));
    assert!(!policy.origin_allowed(Some("https://evil.com")));
    let closed = Policy::default();
    assert!(!closed.may_subscribe(None, "public.news"));
    assert!(closed.origin_allowed(Some("https://anything")));
}
