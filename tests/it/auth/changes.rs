//! Credentials that change while servers run: the admin token file read again, and a revoked
//! key refused by another replica within 10 s, with Redis and without.

use super::*;

#[tokio::test]
async fn a_changed_admin_token_file_is_read_again() {
    let file = admin_token_file("first-admin-token");
    let server = Backend::Memory.start_with(with_tokens(file.clone())).await;
    let first = As::token(&server, "first-admin-token");
    first.create_key(&["read"]).await;

    // A different length, so the change shows even where modification times are coarse.
    std::fs::write(&file, "the-rotated-admin-token\n").unwrap();
    let rotated = As::token(&server, "the-rotated-admin-token");
    eventually(
        "the rotated admin token is accepted",
        EVENTUALLY,
        async || rotated.try_create_key(&["read"], None).await.ok(),
    )
    .await;
    let old = first.try_create_key(&["read"], None).await.unwrap_err();
    assert_error(&old, Code::Unauthenticated, "CREDENTIALS_INVALID");
}

/// Two replicas on one database and one Redis: a key revoked on one is refused by the other
/// within 10 s (at once, through Redis), although the other had it verified in its cache.
#[sqlx::test]
async fn a_revocation_reaches_another_replica_within_ten_seconds(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let file = admin_token_file(ADMIN);
    let prefix = format!("leasehold-test-{}", uuid::Uuid::new_v4());
    let configure = |config: &mut Config| {
        with_tokens(file.clone())(config);
        config.redis_url = Some(crate::redis::redis_url());
        config.redis_key_prefix = prefix.clone();
    };
    let first = TestServer::start_with(pool.clone(), connect.clone(), configure).await;
    let second = TestServer::start_with(pool, connect, configure).await;
    crate::redis::wait_until_redis_is_used(&first).await;
    crate::redis::wait_until_redis_is_used(&second).await;
    revocation_reaches(&first, &second).await;
}

/// Without Redis to carry the revocation, the short cache lifetime bounds it: still within 10 s.
#[sqlx::test]
async fn without_redis_a_revocation_reaches_another_replica_within_ten_seconds(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let file = admin_token_file(ADMIN);
    let first =
        TestServer::start_with(pool.clone(), connect.clone(), with_tokens(file.clone())).await;
    let second = TestServer::start_with(pool, connect, with_tokens(file)).await;
    revocation_reaches(&first, &second).await;
}

/// A key used on `second` (so its verification is cached there) and revoked on `first` is
/// refused by `second` within 10 s, as revoked.
async fn revocation_reaches(first: &TestServer, second: &TestServer) {
    let admin = As::token(first, ADMIN);
    let (key, token) = admin.try_create_key(&["read"], None).await.unwrap();
    let reader = As::token(second, &token);
    let list = || pb::ListRuntimesRequest {
        status: None,
        ..Default::default()
    };
    assert!(reader.admin.clone().list_runtimes(list()).await.is_ok());

    let revoked_at = tokio::time::Instant::now();
    admin
        .admin
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { key_id: key.id })
        .await
        .unwrap();
    let refused = loop {
        match reader.admin.clone().list_runtimes(list()).await {
            Err(status) => break status,
            Ok(_) => {
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(10),
                    "still accepted 10 s after the revocation"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_error(&refused, Code::Unauthenticated, "CREDENTIALS_REVOKED");
}
