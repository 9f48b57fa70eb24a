//! The kube client the controller uses: from a kubeconfig or the in-cluster config, with every
//! request counted by verb and resource (`vfplug_kube_requests_total`), so "what does the
//! controller cost the API server" is a figure, not a guess (docs/domain.md).

use std::path::Path;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

/// Labels of a counted request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// get, watch, create, patch, put, delete.
    pub verb: String,
    /// pods, domains, events, network-attachment-definitions...
    pub resource: String,
}

/// The controller's metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Requests sent to the API server.
    pub requests: Family<RequestLabels, Counter>,
}

impl Metrics {
    /// Registers the metrics (prefix `vfplug_kube`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vfplug_kube_requests",
            "Requests vfplugd's Domain controller sent to the Kubernetes API server",
            self.requests.clone(),
        );
    }

    /// The requests counted so far, in total.
    pub fn total(&self) -> u64 {
        // The family has no iterator; the labels the controller can use are few and known.
        let verbs = ["get", "watch", "create", "patch", "put", "delete", "post"];
        let resources = [
            "pods",
            "domains",
            "events",
            "network-attachment-definitions",
            "other",
        ];
        verbs
            .iter()
            .flat_map(|v| resources.iter().map(move |r| (v, r)))
            .map(|(v, r)| {
                self.requests
                    .get_or_create(&RequestLabels {
                        verb: (*v).to_owned(),
                        resource: (*r).to_owned(),
                    })
                    .get()
            })
            .sum()
    }
}

/// The verb and resource of a request to the API server.
pub fn classify(method: &http::Method, uri: &http::Uri) -> RequestLabels {
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PATCH => "patch",
        http::Method::PUT => "put",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/<res>..., /apis/<group>/<version>/<res>..., with namespaces/<ns>/ before <res>.
    let rest: &[&str] = match segs.first() {
        Some(&"api") => segs.get(2..).unwrap_or(&[]),
        Some(&"apis") => segs.get(3..).unwrap_or(&[]),
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        r => r,
    };
    let resource = match rest.first() {
        Some(r @ (&"pods" | &"domains" | &"events" | &"network-attachment-definitions")) => {
            (*r).to_owned()
        }
        _ => "other".to_owned(),
    };
    RequestLabels {
        verb: verb.to_owned(),
        resource,
    }
}

/// A tower layer that counts requests into [`Metrics`].
#[derive(Clone, Debug)]
pub struct CountLayer(pub Metrics);

impl<S> Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`CountLayer`].
#[derive(Clone, Debug)]
pub struct Count<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B> Service<http::Request<B>> for Count<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.metrics
            .requests
            .get_or_create(&classify(req.method(), req.uri()))
            .inc();
        self.inner.call(req)
    }
}

/// Why there is no client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No kubeconfig (flag, `KUBECONFIG`, `~/.kube/config`) and not in a pod.
    #[error("no kubeconfig and no in-cluster config: {0}")]
    NoConfig(String),
    /// The kubeconfig is there but unusable.
    #[error("kubeconfig {path}: {msg}")]
    BadConfig {
        /// Which file.
        path: String,
        /// Why.
        msg: String,
    },
    /// The client could not be built (TLS, proxy).
    #[error("building the Kubernetes client: {0}")]
    Build(String),
}

/// A client from `kubeconfig`, or else the environment (`KUBECONFIG`, `~/.kube/config`, the
/// in-cluster service account), counting its requests into `metrics`.
pub async fn client(
    kubeconfig: Option<&Path>,
    metrics: &Metrics,
) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |msg: String| ClientError::BadConfig {
                path: path.display().to_string(),
                msg,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ClientError::NoConfig(e.to_string()))?,
    };
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| ClientError::Build(e.to_string()))?;
    Ok(builder.with_layer(&CountLayer(metrics.clone())).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified_by_verb_and_resource() {
        let c = |m: http::Method, u: &str| {
            let l = classify(&m, &u.parse().expect("uri"));
            (l.verb, l.resource)
        };
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            c(
                http::Method::GET,
                "/api/v1/pods?fieldSelector=spec.nodeName%3Dn&watch=true&timeoutSeconds=290"
            ),
            s("watch", "pods")
        );
        assert_eq!(
            c(http::Method::GET, "/api/v1/namespaces/ns/pods/vm"),
            s("get", "pods")
        );
        assert_eq!(
            c(
                http::Method::PATCH,
                "/apis/vfplug.io/v1alpha1/namespaces/ns/domains/vm/status"
            ),
            s("patch", "domains")
        );
        assert_eq!(
            c(
                http::Method::POST,
                "/apis/events.k8s.io/v1/namespaces/ns/events"
            ),
            s("create", "events")
        );
        assert_eq!(
            c(
                http::Method::GET,
                "/apis/k8s.cni.cncf.io/v1/namespaces/ns/network-attachment-definitions/a"
            ),
            s("get", "network-attachment-definitions")
        );
        assert_eq!(c(http::Method::GET, "/version"), s("get", "other"));
    }
}
