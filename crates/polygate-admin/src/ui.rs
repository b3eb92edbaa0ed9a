//! A dashboard's static files at `/ui/` (APISIX 3.13+ serves its built dashboard there from
//! the Admin API's port): files from `gateway.admin.ui`, `index.html` for a directory and for
//! any path without a file (the dashboard routes in the browser). Paths are checked segment
//! by segment: nothing outside the directory is ever read.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, Uri};

use crate::AdminState;

/// `/ui` → `/ui/`.
pub fn redirect() -> Response {
    (
        StatusCode::MOVED_PERMANENTLY,
        [(http::header::LOCATION, "/ui/")],
    )
        .into_response()
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// The file under `root` that `/ui/<rest>` names, if the path stays inside `root`.
pub fn resolve(root: &Path, rest: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(rest)
        .decode_utf8()
        .ok()?;
    if decoded.contains('\0') || decoded.contains('\\') {
        return None;
    }
    let mut out = root.to_path_buf();
    for c in Path::new(decoded.as_ref()).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `GET /ui/...`.
pub async fn serve(State(st): State<Arc<AdminState>>, uri: Uri) -> Response {
    let Some(root) = &st.ui else {
        return crate::error(
            StatusCode::NOT_FOUND,
            "no dashboard: set gateway.admin.ui to the directory of a built dashboard",
        );
    };
    let rest = uri.path().strip_prefix("/ui").unwrap_or("");
    let Some(mut path) = resolve(root, rest) else {
        return (StatusCode::BAD_REQUEST, "bad path\n").into_response();
    };
    // no symlink may lead outside the directory
    let inside = |p: &Path| match (p.canonicalize(), root.canonicalize()) {
        (Ok(p), Ok(r)) => p.starts_with(r),
        _ => false,
    };
    if path.is_dir() {
        path.push("index.html");
    }
    if !path.is_file() {
        // the dashboard's own routes (`/ui/routes/list`): its index page handles them
        let ext = Path::new(rest).extension().is_some();
        if ext {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        }
        path = root.join("index.html");
    }
    if !inside(&path) {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let mut r = (StatusCode::OK, bytes).into_response();
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&path)),
            );
            r
        }
        Err(_) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_directory() {
        let root = Path::new("/srv/ui");
        assert_eq!(
            resolve(root, "/a/b.js"),
            Some(PathBuf::from("/srv/ui/a/b.js"))
        );
        assert_eq!(resolve(root, "/"), Some(PathBuf::from("/srv/ui")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/%2e%2e/etc/passwd"), None);
        assert_eq!(resolve(root, "/a/..%2f..%2fx"), None);
        assert_eq!(resolve(root, "/a%00b"), None);
    }
}
