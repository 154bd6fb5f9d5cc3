//! What a Kubernetes API request asks, read from its method and path as the API server reads
//! them (verb, resource, namespace, name), for the audit record of every request through the
//! root. Only the path's shape is read: nothing here decides anything.

use http::Method;

/// A request's verb and object, for the audit record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`,
    /// `connect` (exec, attach, port-forward, proxy); for a non-resource path (`/version`),
    /// the method in lower case.
    pub verb: String,
    /// `pods`, `deployments.apps`, ...; empty for a non-resource path.
    pub resource: String,
    /// `log`, `exec`, `status`, ...
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

/// Subresources that open a connection rather than read or write an object.
const CONNECT_SUBRESOURCES: [&str; 4] = ["exec", "attach", "portforward", "proxy"];

impl RequestInfo {
    /// Reads `path` (without its query) and whether the query asks to watch.
    pub fn parse(method: &Method, path: &str, watch: bool) -> Self {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, rest) = match segments.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return Self::non_resource(method),
        };
        if rest.is_empty() {
            return Self::non_resource(method);
        }
        let mut info = RequestInfo::default();
        let object: &[&str] = match rest {
            ["namespaces", namespace, object @ ..] if !object.is_empty() => {
                info.namespace = (*namespace).to_owned();
                object
            }
            other => other,
        };
        info.resource = match group {
            "" => object[0].to_owned(),
            group => format!("{}.{group}", object[0]),
        };
        info.name = object.get(1).copied().unwrap_or_default().to_owned();
        info.subresource = object.get(2).copied().unwrap_or_default().to_owned();
        info.verb = info.verb_of(method, watch).to_owned();
        info
    }

    fn non_resource(method: &Method) -> Self {
        RequestInfo {
            verb: method.as_str().to_ascii_lowercase(),
            ..RequestInfo::default()
        }
    }

    fn verb_of(&self, method: &Method, watch: bool) -> &'static str {
        if CONNECT_SUBRESOURCES.contains(&self.subresource.as_str()) {
            return "connect";
        }
        let named = !self.name.is_empty();
        match *method {
            Method::GET if watch => "watch",
            Method::GET | Method::HEAD if named => "get",
            Method::GET | Method::HEAD => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if named => "delete",
            Method::DELETE => "deletecollection",
            _ => "unknown",
        }
    }
}

/// Whether a query string asks to watch (`watch=true` or `watch=1`).
pub fn asks_to_watch(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1" | "watch"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_verbs_and_objects_as_the_api_server_does() {
        // (method, path, watch) → "verb resource subresource namespace name"
        let cases = [
            (
                Method::GET,
                "/api/v1/namespaces/default/pods",
                false,
                "list pods - default -",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/default/pods",
                true,
                "watch pods - default -",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods/p/log",
                false,
                "get pods log a p",
            ),
            (
                Method::POST,
                "/api/v1/namespaces/a/pods/p/exec",
                false,
                "connect pods exec a p",
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/a/deployments/d",
                false,
                "patch deployments.apps - a d",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/kube-system",
                false,
                "get namespaces - - kube-system",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/configmaps",
                false,
                "deletecollection configmaps - a -",
            ),
            (Method::GET, "/version", false, "get - - - -"),
            (Method::GET, "/apis", false, "get - - - -"),
        ];
        for (method, path, watch, expected) in cases {
            let i = RequestInfo::parse(&method, path, watch);
            let field = |f: &str| {
                if f.is_empty() {
                    "-".to_owned()
                } else {
                    f.to_owned()
                }
            };
            let read = [&i.verb, &i.resource, &i.subresource, &i.namespace, &i.name]
                .map(|f| field(f))
                .join(" ");
            assert_eq!(read, expected, "{method} {path}");
        }
        assert!(asks_to_watch(Some("labelSelector=a&watch=true")));
        assert!(!asks_to_watch(Some("watchx=true")));
    }
}
