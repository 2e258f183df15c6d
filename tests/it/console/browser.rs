//! The console in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! scripts/test installs), driven over WebDriver: sign in, read a queue's counts and chart, open
//! a failed task and read its error, retry it, bulk-cancel by filter after the confirmation,
//! and watch the queue table follow a change live. Screenshots land in
//! `target/console-screenshots/` for people to look at.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use leasehold::proto as pb;
use serde_json::json;

use super::console_server;
use crate::auth::{ADMIN, As};
use crate::harness::{Backend, EVENTUALLY, eventually, free_port, task_id};

/// A headless Chromium behind its chromedriver, both stopped when dropped.
struct Chrome {
    driver: Child,
    client: Client,
}

impl Drop for Chrome {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Chrome {
    async fn start() -> Chrome {
        let port = free_port();
        let driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (scripts/test installs Debian's chromium-driver)");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1500,1000",
            ] }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually("chromedriver answers", EVENTUALLY, async || {
            ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
                .ok()
        })
        .await;
        Chrome { driver, client }
    }

    /// The text of the first element `css` selects, once there is one. Read again when the
    /// live refresh replaced the element meanwhile.
    async fn text(&self, css: &str) -> String {
        eventually(css, EVENTUALLY, async || {
            let element = self.client.find(Locator::Css(css)).await.ok()?;
            element.text().await.ok()
        })
        .await
    }

    async fn attribute(&self, css: &str, name: &str) -> String {
        eventually(css, EVENTUALLY, async || {
            let element = self.client.find(Locator::Css(css)).await.ok()?;
            element.attr(name).await.ok()?
        })
        .await
    }

    async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(EVENTUALLY)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no {css}: {error}"))
            .click()
            .await
            .unwrap();
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

fn chromedriver() -> PathBuf {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| "chromedriver".into())
}

/// Six tasks in `emails`: three completed, one failed for good with a readable error, two
/// queued (as the admin: the server signs every call in).
async fn traffic(admin: &As) {
    let (runtime, _) = admin.register("mailer-1", &["emails"]).await.unwrap();
    for _ in 0..6 {
        admin.enqueue("emails").await.unwrap();
    }
    let mut worker = admin.worker.clone();
    let claimed = worker
        .claim_task(pb::ClaimTaskRequest {
            runtime_id: runtime,
            max_tasks: Some(4),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    for (index, task) in claimed.iter().enumerate() {
        let (id, token) = (task_id(task).to_owned(), task.claim_token.clone());
        worker
            .start_task(pb::StartTaskRequest {
                task_id: id.clone(),
                claim_token: token.clone(),
            })
            .await
            .unwrap();
        if index < 3 {
            worker
                .complete_task(pb::CompleteTaskRequest {
                    task_id: id,
                    claim_token: token,
                    result: b"sent".to_vec(),
                })
                .await
                .unwrap();
        } else {
            worker
                .fail_task(pb::FailTaskRequest {
                    task_id: id,
                    claim_token: token,
                    error: "SMTP 550: mailbox unavailable".into(),
                    retryable: false,
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn an_operator_signs_in_reads_a_failure_retries_it_and_bulk_cancels() {
    let (server, address) = console_server(Backend::Memory, true).await;
    let _serving = &server;
    let admin = As::token(&server, ADMIN);
    traffic(&admin).await;
    let chrome = Chrome::start().await;
    let base = format!("http://{address}");

    chrome.client.goto(&format!("{base}/queues")).await.unwrap();
    assert!(chrome.client.current_url().await.unwrap().path() == "/sign-in");
    chrome
        .client
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(ADMIN)
        .await
        .unwrap();
    chrome.click("#sign-in").await;

    let row = "tr[data-queue=\"emails\"]";
    assert_eq!(chrome.text(&format!("{row} td.count.queued")).await, "2");
    assert_eq!(chrome.text(&format!("{row} td.count.completed")).await, "3");
    assert_eq!(
        chrome
            .attribute(&format!("{row} svg.chart"), "data-completed")
            .await,
        "3"
    );
    chrome.screenshot("queues").await;

    chrome
        .client
        .goto(&format!("{base}/tasks?queue=emails&status=FAILED"))
        .await
        .unwrap();
    chrome.click("#tasks tr.task a").await;
    assert!(
        chrome
            .text("#task-error")
            .await
            .contains("mailbox unavailable")
    );
    chrome.screenshot("failed-task").await;
    chrome.click("#retry").await;
    eventually("the task is queued again", EVENTUALLY, async || {
        (chrome.text("#task-status").await == "QUEUED").then_some(())
    })
    .await;

    chrome
        .client
        .goto(&format!("{base}/tasks?queue=emails"))
        .await
        .unwrap();
    chrome.click("#bulk-cancel").await;
    assert_eq!(
        chrome.attribute("#confirm-count", "data-matched").await,
        "3",
        "two queued and the retried one"
    );
    chrome.screenshot("bulk-confirm").await;
    chrome.click("#confirm").await;
    assert_eq!(chrome.attribute("#done", "data-changed").await, "3");
    let counts = admin
        .admin
        .clone()
        .describe_queue(pb::DescribeQueueRequest {
            queue: "emails".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .counts
        .unwrap();
    assert_eq!(counts.cancelled, 3);

    // The queue table follows the server without a reload (server-sent events).
    chrome.client.goto(&format!("{base}/queues")).await.unwrap();
    assert_eq!(chrome.text(&format!("{row} td.count.queued")).await, "0");
    admin.enqueue("emails").await.unwrap();
    eventually(
        "the live table shows the new task",
        EVENTUALLY,
        async || (chrome.text(&format!("{row} td.count.queued")).await == "1").then_some(()),
    )
    .await;
    chrome.screenshot("queues-live").await;
    chrome.client.clone().close().await.unwrap();
}
