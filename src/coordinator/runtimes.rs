//! Credentials and runtimes: authentication, API keys, registration, liveness, deregistration.

use super::*;

impl Coordinator {
    /// The caller behind a bearer token (spec §9).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal> {
        self.authenticator.authenticate(bearer).await
    }

    /// Re-reads the admin token file when it changes, until `stop`.
    pub async fn watch_admin_token(&self, stop: CancellationToken) {
        self.authenticator.watch_admin_token(stop).await;
    }

    /// A credential was revoked or replaced here or on another replica: none verified before
    /// may be trusted from the cache.
    pub fn forget_credentials(&self) {
        self.authenticator.forget_everything();
    }

    /// Tells this replica and (through Redis) the others to forget verified credentials.
    pub(super) async fn announce_revocation(&self) {
        self.authenticator.forget_everything();
        if let Some(redis) = &self.redis {
            redis.announce_revocation(&self.relay).await;
        }
    }

    pub async fn create_api_key(
        &self,
        name: String,
        grants: Vec<Grant>,
        expires_in: Option<Duration>,
    ) -> Result<(ApiKey, TokenText)> {
        validate::required_text("name", &name)?;
        if grants.is_empty() {
            return Err(Error::invalid(
                "scopes",
                "an API key needs at least one scope",
            ));
        }
        let (id, secret) = (uuid::Uuid::new_v4(), Secret::random());
        let key = self
            .store
            .create_api_key(NewApiKey {
                id,
                name,
                grants,
                digest: secret.digest(),
                expires_in,
            })
            .await?;
        tracing::info!(key_id = %key.id, name = %key.name, "API key created");
        Ok((key, TokenText::api_key(id, &secret)))
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        self.store.list_api_keys().await
    }

    pub async fn revoke_api_key(&self, key_id: uuid::Uuid) -> Result<ApiKey> {
        let key = self.store.revoke_api_key(key_id).await?;
        self.announce_revocation().await;
        tracing::info!(%key_id, "API key revoked");
        Ok(key)
    }

    pub async fn register_runtime(&self, mut runtime: NewRuntime) -> Result<Registration> {
        validate::required_text("name", &runtime.name)?;
        validate::string_map("labels", &runtime.labels)?;
        if runtime.queues.is_empty() || runtime.queues.len() > validate::MAX_RUNTIME_QUEUES {
            return Err(Error::invalid(
                "queues",
                format!(
                    "a runtime serves 1 to {} queues",
                    validate::MAX_RUNTIME_QUEUES
                ),
            ));
        }
        for queue in &runtime.queues {
            validate::queue_name("queues", queue)?;
        }
        runtime.queues.sort();
        runtime.queues.dedup();
        let secret = Secret::random();
        let runtime = self
            .store
            .register_runtime(runtime, secret.digest())
            .await?;
        // The previous token of this name is revoked: no replica may trust it from its cache.
        self.announce_revocation().await;
        let runtime_token = TokenText::runtime(runtime.id, &secret);
        self.liveness.flushed(&[runtime.id]).await;
        self.claim_cache.learn_queues(runtime.id, &runtime.queues);
        // Its queues may have changed: no verdict computed for the old ones may stand.
        self.announce_topics(Wakes::all([Topic::Runtime(runtime.id)]), &[])
            .await;
        tracing::info!(runtime_id = %runtime.id, name = %runtime.name, "runtime registered");
        Ok(Registration {
            runtime,
            runtime_token,
            heartbeat_interval: self.settings.heartbeat_interval,
            lease_duration: self.settings.lease_duration,
        })
    }

    /// Redis takes the beat; PostgreSQL's `last_seen_at` is written too when it is due (or
    /// without Redis). The beat succeeds while either store could record it: an unreachable
    /// database does not fail a runtime whose beat Redis holds.
    pub async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
        let recorded = self.liveness.record(&[runtime_id]).await;
        let redis_only = HeartbeatAck {
            server_time: Utc::now(),
            status: RuntimeStatus::Online,
        };
        if recorded.as_deref() == Some(&[false]) {
            return Ok(redis_only);
        }
        match self.store.heartbeat(runtime_id).await {
            Ok(ack) => {
                self.liveness.flushed(&[runtime_id]).await;
                Ok(ack)
            }
            Err(Error::StoreUnavailable(error)) if recorded.is_some() => {
                tracing::warn!(%runtime_id, %error, "heartbeat recorded in Redis only");
                Ok(redis_only)
            }
            Err(error) => Err(error),
        }
    }

    /// A call of `runtime_id` was accepted: it is alive. Recorded off the call's path.
    pub fn note_sign_of_life(&self, runtime_id: RuntimeId) {
        self.signs_of_life.note(runtime_id);
    }

    /// Records the signs of life noted on this replica, until `stop`.
    pub async fn record_signs_of_life(&self, stop: CancellationToken) {
        self.signs_of_life
            .run(&self.liveness, self.store.as_ref(), stop)
            .await;
    }

    /// Records the signs of life noted so far now, rather than at the next interval.
    pub async fn flush_signs_of_life(&self) {
        self.signs_of_life
            .record(&self.liveness, self.store.as_ref())
            .await;
    }

    /// Graceful exit: OFFLINE, unstarted claims requeued (T4''). Returns how many.
    pub async fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<u32> {
        let requeued = self.store.deregister_runtime(runtime_id).await?;
        self.liveness.forget(runtime_id).await;
        self.announce(&requeued).await;
        tracing::info!(%runtime_id, requeued = requeued.len(), "runtime deregistered");
        Ok(u32::try_from(requeued.len()).unwrap_or(u32::MAX))
    }

    pub async fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered> {
        let recovered = self.store.recover_orphans(runtime_id).await?;
        self.count_server_failures("RUNTIME_RECOVERY", &recovered.moved);
        self.announce(&recovered.moved).await;
        tracing::info!(
            %runtime_id,
            failed = recovered.failed(),
            retried = recovered.retried(),
            "orphans recovered"
        );
        Ok(recovered)
    }

    /// A page of runtimes by name after `after`, and whether more follow (the page's last
    /// name is then where the next starts). `page_size`: 0 = the default, capped.
    pub async fn list_runtimes(
        &self,
        status: Option<RuntimeStatus>,
        after: Option<String>,
        page_size: u32,
    ) -> Result<(Vec<Runtime>, bool)> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let mut runtimes = self
            .store
            .list_runtimes(status, after, page_size + 1)
            .await?;
        let more = runtimes.len() > page_size as usize;
        runtimes.truncate(page_size as usize);
        Ok((runtimes, more))
    }
}
