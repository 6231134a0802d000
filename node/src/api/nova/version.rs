//! Compute API microversions: negotiation as Nova does it, and the typed version handlers
//! compare against.
//!
//! A request names its version in `OpenStack-API-Version: compute X.Y` (preferred) or the
//! legacy `X-OpenStack-Nova-API-Version: X.Y`; `latest` means [`MAX`], no header means
//! [`MIN`] (2.1). A version that is not `Major.Minor` (no leading zeros) is a 400; one outside
//! [`MIN`]..=[`MAX`] a 406, and neither answer carries version headers (Nova's requests keep a
//! null version then). Every other answer names the version it was served at in both headers,
//! with `Vary` on both. The [`microversion`] layer stores the negotiated version in the
//! request's extensions; handlers take it as a [`Microversion`] extractor and test
//! `v >= V2_9`.

use std::fmt;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;

/// A compute API microversion, `major.minor`; ordered as versions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Microversion {
    pub major: u32,
    pub minor: u32,
}

impl Microversion {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses `Major.Minor` as Nova's `APIVersionRequest` does: both parts decimal, without
    /// leading zeros (a minor of `0` is allowed, a major of `0` is not).
    pub fn parse(s: &str) -> Option<Self> {
        let (major, minor) = s.split_once('.')?;
        let number = |p: &str, zero_ok: bool| -> Option<u32> {
            let digits = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
            let leading_zero = p.len() > 1 && p.starts_with('0');
            if !digits || leading_zero || (!zero_ok && p == "0") {
                return None;
            }
            p.parse().ok()
        };
        Some(Self::new(number(major, false)?, number(minor, true)?))
    }
}

impl fmt::Display for Microversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

pub const V2_1: Microversion = Microversion::new(2, 1);
pub const V2_2: Microversion = Microversion::new(2, 2);
pub const V2_3: Microversion = Microversion::new(2, 3);
pub const V2_5: Microversion = Microversion::new(2, 5);
pub const V2_7: Microversion = Microversion::new(2, 7);
pub const V2_9: Microversion = Microversion::new(2, 9);
pub const V2_10: Microversion = Microversion::new(2, 10);
pub const V2_11: Microversion = Microversion::new(2, 11);
pub const V2_13: Microversion = Microversion::new(2, 13);
pub const V2_15: Microversion = Microversion::new(2, 15);
pub const V2_16: Microversion = Microversion::new(2, 16);
pub const V2_17: Microversion = Microversion::new(2, 17);
pub const V2_18: Microversion = Microversion::new(2, 18);
pub const V2_19: Microversion = Microversion::new(2, 19);
pub const V2_20: Microversion = Microversion::new(2, 20);
pub const V2_21: Microversion = Microversion::new(2, 21);
pub const V2_25: Microversion = Microversion::new(2, 25);
pub const V2_26: Microversion = Microversion::new(2, 26);
pub const V2_28: Microversion = Microversion::new(2, 28);
pub const V2_32: Microversion = Microversion::new(2, 32);
pub const V2_33: Microversion = Microversion::new(2, 33);
pub const V2_35: Microversion = Microversion::new(2, 35);
pub const V2_36: Microversion = Microversion::new(2, 36);
pub const V2_39: Microversion = Microversion::new(2, 39);
pub const V2_42: Microversion = Microversion::new(2, 42);

/// The lowest version Shoal serves, and the one a request without a version header gets.
pub const MIN: Microversion = V2_1;
/// The highest version Shoal serves: every change up to it is implemented (or concerns an API
/// Shoal does not serve at all); docs/api-coverage.md lists them version by version.
pub const MAX: Microversion = V2_36;

/// The version string a request names, from `OpenStack-API-Version` (the `compute` entry of
/// its comma-separated `service version` pairs) or else the legacy header.
fn requested(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all("openstack-api-version") {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split_whitespace();
            if parts
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case("compute"))
            {
                if let Some(v) = parts.next() {
                    return Some(v.to_owned());
                }
            }
        }
    }
    headers
        .get("x-openstack-nova-api-version")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The version a request is served at, or Nova's 400 (malformed) or 406 (outside the range).
pub fn negotiate(headers: &HeaderMap) -> Result<Microversion, ApiError> {
    let Some(asked) = requested(headers) else {
        return Ok(MIN);
    };
    if asked.eq_ignore_ascii_case("latest") {
        return Ok(MAX);
    }
    let v = Microversion::parse(&asked).ok_or_else(|| {
        ApiError::bad_request(format!(
            "API Version String {asked} is of invalid format. Must be of format MajorNum.MinorNum."
        ))
    })?;
    if v < MIN || v > MAX {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "Version {v} is not supported by the API. Minimum is {MIN} and maximum is {MAX}."
            ),
        ));
    }
    Ok(v)
}

/// The layer over every compute route: negotiates, hands the version to the handlers and
/// names it in the answer.
pub async fn microversion(mut req: Request, next: Next) -> Response {
    let v = match negotiate(req.headers()) {
        Ok(v) => v,
        Err(e) => return e.nova().into_response(),
    };
    req.extensions_mut().insert(v);
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("compute {v}")) {
        h.insert("OpenStack-API-Version", value);
    }
    if let Ok(value) = HeaderValue::from_str(&v.to_string()) {
        h.insert("X-OpenStack-Nova-API-Version", value);
    }
    h.insert(
        "Vary",
        HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
    );
    resp
}

/// The proxy APIs (to the Image and Network APIs) end at 2.35: from 2.36 Nova answers them
/// 404, as it does any call the requested version does not have.
pub fn proxy_api(v: Microversion) -> Result<(), ApiError> {
    if v >= V2_36 {
        Err(ApiError::not_found("The resource could not be found.").nova())
    } else {
        Ok(())
    }
}

/// [`proxy_api`] as a layer, for a router whose every call is a proxy; it goes inside the
/// [`microversion`] layer, which negotiates first.
pub async fn proxy_routes(req: Request, next: Next) -> Response {
    let v = req
        .extensions()
        .get::<Microversion>()
        .copied()
        .unwrap_or(MIN);
    match proxy_api(v) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The image metadata proxy ends at 2.38 (the rest of the image proxy at 2.35): a layer that
/// answers 404 from 2.39, inside the [`microversion`] layer.
pub async fn image_metadata_routes(req: Request, next: Next) -> Response {
    let v = req
        .extensions()
        .get::<Microversion>()
        .copied()
        .unwrap_or(MIN);
    if v >= V2_39 {
        return ApiError::not_found("The resource could not be found.")
            .nova()
            .into_response();
    }
    next.run(req).await
}

/// Nova's schema refusal of a body field that the requested version does not have yet: a 400,
/// as any unexpected property is.
pub fn unexpected(field: &str, since: Microversion) -> ApiError {
    ApiError::bad_request(format!(
        "Invalid input for field/attribute {field}. Additional properties are not allowed \
         ('{field}' was unexpected; it needs microversion {since} or later)"
    ))
    .nova()
}

impl<S: Send + Sync> FromRequestParts<S> for Microversion {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Microversion>()
            .copied()
            .unwrap_or(MIN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn parse_follows_novas_format() {
        assert_eq!(Microversion::parse("2.1"), Some(V2_1));
        assert_eq!(Microversion::parse("2.19"), Some(V2_19));
        assert_eq!(Microversion::parse("3.0"), Some(Microversion::new(3, 0)));
        for bad in [
            "", "2", "2.", ".1", "2.01", "02.1", "0.1", "2.1.1", "v2.1", "2.x", " 2.1", "-2.1",
        ] {
            assert_eq!(Microversion::parse(bad), None, "{bad:?}");
        }
        assert!(V2_2 > V2_1 && V2_10 > V2_9 && Microversion::new(3, 0) > V2_19);
    }

    #[test]
    fn no_header_is_the_minimum() {
        assert_eq!(negotiate(&HeaderMap::new()).unwrap(), MIN);
        // Another service's entry in the new header does not name a compute version.
        assert_eq!(
            negotiate(&headers(&[("OpenStack-API-Version", "volume 3.5")])).unwrap(),
            MIN
        );
    }

    #[test]
    fn both_headers_and_latest() {
        assert_eq!(
            negotiate(&headers(&[("OpenStack-API-Version", "compute 2.1")])).unwrap(),
            V2_1
        );
        assert_eq!(
            negotiate(&headers(&[("X-OpenStack-Nova-API-Version", "2.1")])).unwrap(),
            V2_1
        );
        assert_eq!(
            negotiate(&headers(&[("OpenStack-API-Version", "compute latest")])).unwrap(),
            MAX
        );
        assert_eq!(
            negotiate(&headers(&[("X-OpenStack-Nova-API-Version", "latest")])).unwrap(),
            MAX
        );
        // The new header wins over the legacy one, and may list several services.
        assert_eq!(
            negotiate(&headers(&[
                ("OpenStack-API-Version", "identity 3.0, compute 2.1"),
                ("X-OpenStack-Nova-API-Version", "9.9"),
            ]))
            .unwrap(),
            V2_1
        );
    }

    #[test]
    fn out_of_range_is_406_and_malformed_is_400() {
        let above = Microversion::new(MAX.major, MAX.minor + 1).to_string();
        for v in [above.as_str(), "2.0", "1.1", "3.0"] {
            let e = negotiate(&headers(&[("X-OpenStack-Nova-API-Version", v)])).unwrap_err();
            assert_eq!(e.status, StatusCode::NOT_ACCEPTABLE, "{v}");
            assert!(
                e.message.contains(&format!("maximum is {MAX}")),
                "{}",
                e.message
            );
        }
        for v in ["2.01", "two", "2"] {
            let e = negotiate(&headers(&[(
                "OpenStack-API-Version",
                &format!("compute {v}"),
            )]))
            .unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{v}");
            assert!(e.message.contains("invalid format"), "{}", e.message);
        }
    }
}
