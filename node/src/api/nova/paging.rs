//! `limit` and `marker` paging as Nova's `common.get_limit_and_marker` and its views'
//! `_get_collection_links` do it, for the lists that gained paging with a microversion
//! (hypervisors at 2.33, key pairs at 2.35).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::api::error::ApiError;

/// Nova's `[api] max_limit`: no page is longer, whatever `limit` says.
pub const MAX_LIMIT: usize = 1000;

/// A page's bounds: at most `limit` items after the one whose id is `marker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub limit: usize,
    pub marker: Option<String>,
}

impl Page {
    /// The bounds a query names; `limit` is a non-negative integer (else a 400), capped at
    /// [`MAX_LIMIT`], which is also the default.
    pub fn from_query(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let limit = match q.get("limit") {
            None => MAX_LIMIT,
            Some(l) => l.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!(
                    "Invalid input for query parameters limit. Value: {l}. limit must be a \
                     non-negative integer"
                ))
                .nova()
            })?,
        };
        Ok(Self {
            limit: limit.min(MAX_LIMIT),
            marker: q.get("marker").cloned(),
        })
    }

    /// The page of `items` (already in the list's order): those after the marker, at most
    /// `limit`. A marker no item has gives `None`: each API words that 400 its own way.
    pub fn apply<T>(&self, mut items: Vec<T>, id: impl Fn(&T) -> String) -> Option<Vec<T>> {
        if let Some(marker) = &self.marker {
            let at = items.iter().position(|i| id(i) == *marker)?;
            items.drain(..=at);
        }
        items.truncate(self.limit);
        Some(items)
    }

    /// Nova's `{collection}_links`: a `next` link when the page is full (`limit`, or
    /// [`MAX_LIMIT`] without one, items), carrying the query with `marker` set to the last
    /// item's id; `None` otherwise.
    pub fn links(
        &self,
        base_url: &str,
        collection: &str,
        q: &HashMap<String, String>,
        shown: usize,
        last_id: Option<String>,
    ) -> Option<Value> {
        let last = last_id?;
        if self.limit == 0 || shown != self.limit {
            return None;
        }
        let mut params: BTreeMap<&str, &str> =
            q.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        params.insert("marker", &last);
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        Some(json!([{
            "rel": "next",
            "href": format!("{base_url}/compute/v2.1/{collection}?{}", query.join("&")),
        }]))
    }
}

/// Percent-encodes a query component as Python's `urlencode` does (`quote_plus`).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn limit_and_marker_cut_the_list() {
        let items: Vec<u32> = (1..=5).collect();
        let page = Page::from_query(&q(&[("limit", "2"), ("marker", "2")])).unwrap();
        assert_eq!(page.apply(items.clone(), u32::to_string), Some(vec![3, 4]));
        let page = Page::from_query(&q(&[("marker", "9")])).unwrap();
        assert_eq!(page.apply(items.clone(), u32::to_string), None);
        let page = Page::from_query(&q(&[])).unwrap();
        assert_eq!(page.limit, MAX_LIMIT);
        assert_eq!(page.apply(items, u32::to_string).unwrap().len(), 5);
        for bad in ["-1", "x", "1.5"] {
            let e = Page::from_query(&q(&[("limit", bad)])).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
        assert_eq!(
            Page::from_query(&q(&[("limit", "5000")])).unwrap().limit,
            MAX_LIMIT
        );
    }

    #[test]
    fn a_full_page_links_to_the_next() {
        let query = q(&[("limit", "2"), ("user_id", "a b")]);
        let page = Page::from_query(&query).unwrap();
        let links = page
            .links("http://h:1", "os-keypairs", &query, 2, Some("k/2".into()))
            .unwrap();
        assert_eq!(
            links[0]["href"],
            "http://h:1/compute/v2.1/os-keypairs?limit=2&marker=k%2F2&user_id=a+b"
        );
        assert_eq!(links[0]["rel"], "next");
        assert!(page
            .links("http://h:1", "os-keypairs", &query, 1, Some("k".into()))
            .is_none());
        let zero = Page::from_query(&q(&[("limit", "0")])).unwrap();
        assert!(zero.links("h", "c", &query, 0, None).is_none());
    }
}
