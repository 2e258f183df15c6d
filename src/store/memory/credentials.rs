//! API keys and runtime credentials on the embedded store.

use uuid::Uuid;

use super::*;

pub(super) fn create(store: &MemoryStore, key: NewApiKey) -> Result<ApiKey> {
    let now = store.now();
    let api_key = ApiKey {
        id: key.id,
        name: key.name,
        grants: key.grants,
        created_at: now,
        expires_at: key.expires_in.map(|expires_in| now + to_chrono(expires_in)),
        last_used_at: None,
        revoked_at: None,
    };
    store.state().api_keys.push((api_key.clone(), key.digest));
    Ok(api_key)
}

pub(super) fn list(store: &MemoryStore) -> Result<Vec<ApiKey>> {
    Ok(store
        .state()
        .api_keys
        .iter()
        .map(|(key, _)| key.clone())
        .collect())
}

pub(super) fn revoke(store: &MemoryStore, key_id: Uuid) -> Result<ApiKey> {
    let now = store.now();
    let mut state = store.state();
    let (key, _) = state
        .api_keys
        .iter_mut()
        .find(|(key, _)| key.id == key_id)
        .ok_or(Error::ApiKeyNotFound(key_id))?;
    key.revoked_at.get_or_insert(now);
    Ok(key.clone())
}

pub(super) fn find(store: &MemoryStore, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>> {
    Ok(store
        .state()
        .api_keys
        .iter()
        .find(|(key, _)| key.id == key_id)
        .cloned())
}

pub(super) fn note_used(store: &MemoryStore, key_id: Uuid) -> Result<()> {
    let now = store.now();
    if let Some((key, _)) = store
        .state()
        .api_keys
        .iter_mut()
        .find(|(key, _)| key.id == key_id)
    {
        key.last_used_at = Some(now);
    }
    Ok(())
}

pub(super) fn runtime(
    store: &MemoryStore,
    runtime_id: RuntimeId,
) -> Result<Option<RuntimeCredential>> {
    Ok(store.state().runtime_credentials.get(&runtime_id).cloned())
}
