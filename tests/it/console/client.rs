//! A cookie-keeping HTTP/1.1 client for the console: what a browser does, minus the browser.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// One answer: its status, where it redirects, its body.
pub struct Page {
    pub status: StatusCode,
    pub location: Option<String>,
    pub set_cookie: Option<String>,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Page {
    /// The CSRF token the page's forms carry.
    pub fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self
            .body
            .find(marker)
            .unwrap_or_else(|| panic!("no form with a CSRF token in: {}", self.body))
            + marker.len();
        let end = self.body[start..].find('"').unwrap() + start;
        self.body[start..end].to_owned()
    }

    pub fn redirects_to(&self, path: &str) -> bool {
        self.status.is_redirection() && self.location.as_deref() == Some(path)
    }
}

pub struct Visitor {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// `leasehold_session=…`, as the last Set-Cookie left it.
    pub cookie: Option<String>,
}

impl Visitor {
    pub fn new(address: SocketAddr) -> Visitor {
        Visitor {
            base: format!("http://{address}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
            cookie: None,
        }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body: Vec<String> = fields
            .iter()
            .map(|(key, value)| format!("{}={}", encode(key), encode(value)))
            .collect();
        self.send(Method::POST, path, Some(body.join("&"))).await
    }

    async fn send(&mut self, method: Method, path: &str, form: Option<String>) -> Page {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie);
        }
        if form.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let request = request
            .body(Full::new(Bytes::from(form.unwrap_or_default())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let text = |name| {
            response
                .headers()
                .get(name)
                .map(|value: &http::HeaderValue| value.to_str().unwrap().to_owned())
        };
        let location = text(header::LOCATION);
        let set_cookie = text(header::SET_COOKIE);
        let headers = response.headers().clone();
        if let Some(set) = &set_cookie {
            let pair = set.split(';').next().unwrap().to_owned();
            self.cookie = (!set.contains("Max-Age=0")).then_some(pair);
        }
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Page {
            status,
            location,
            set_cookie,
            headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The data of the first server-sent event named `name` on `/events`, within 15 s.
pub async fn first_event(address: SocketAddr, cookie: &str, name: &str) -> String {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{address}/events"))
        .header(header::COOKIE, cookie)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut seen = String::new();
    let marker = format!("event: {name}\ndata: ");
    let read = async {
        loop {
            let frame = body.frame().await.expect("the stream ended").unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
            if let Some(start) = seen.find(&marker)
                && let Some(end) = seen[start + marker.len()..].find('\n')
            {
                let data = start + marker.len();
                return seen[data..data + end].to_owned();
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), read)
        .await
        .expect("an event within 15 s")
}
