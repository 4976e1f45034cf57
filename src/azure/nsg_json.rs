//! An NSG's JSON as Azure returned it, kept encoded (`RawValue`): what a whole-NSG write sends
//! back is this text with only the named rules and properties changed, unknown fields included.
//! Never parsed whole: in a burst every NSG may be read and waiting for its write at once, and a
//! parsed `serde_json::Value` is several times the size of its text.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::convert::{from_model, to_model};
use super::error::AzureError;
use super::{NsgPage, NsgSnapshot};
use crate::plan::rule::NsgRule;

/// The NSG text's fields that reading it needs.
#[derive(Deserialize)]
struct Read<'a> {
    #[serde(default)]
    etag: Option<Value>,
    #[serde(default, borrow)]
    properties: Option<ReadProperties<'a>>,
}

#[derive(Deserialize)]
struct ReadProperties<'a> {
    #[serde(default, borrow, rename = "securityRules")]
    security_rules: Option<Vec<&'a RawValue>>,
}

/// A security rule's name, all a write needs to know of a rule it keeps.
#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    name: Option<String>,
}

/// The NSG's body etag (if a string) and its user security rules, parsed as
/// [`super::NetworkApi::list_rules`] does.
pub fn etag_and_rules(
    raw: &RawValue,
    nsg_id: &str,
) -> Result<(Option<String>, Vec<NsgRule>), AzureError> {
    let parsed = read_nsg_text(raw, nsg_id)?;
    Ok((parsed.etag, parsed.rules))
}

/// What reading an NSG's text gives: its body etag (if a string) and user rules.
struct Parsed {
    etag: Option<String>,
    rules: Vec<NsgRule>,
}

/// Reads the NSG's text once; `nsg_id` names it in errors.
fn read_nsg_text(raw: &RawValue, nsg_id: &str) -> Result<Parsed, AzureError> {
    let read: Read = serde_json::from_str(raw.get())
        .map_err(|e| AzureError::InvalidResponse(format!("NSG {nsg_id}: {e}")))?;
    let etag = read
        .etag
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_string);
    let rules = read
        .properties
        .and_then(|p| p.security_rules)
        .unwrap_or_default()
        .into_iter()
        .map(|rule| {
            let model: azure_mgmt_network::models::SecurityRule = serde_json::from_str(rule.get())
                .map_err(|e| {
                    AzureError::InvalidResponse(format!(
                        "a security rule of NSG {nsg_id} does not parse: {e}"
                    ))
                })?;
            from_model(&model)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed { etag, rules })
}

/// A page of a list of NSGs (`NetworkSecurityGroups_List`), borrowed from its text.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(default, borrow)]
    value: Vec<&'a RawValue>,
    #[serde(default, rename = "nextLink")]
    next_link: Option<String>,
}

fn read_page(body: &[u8]) -> Result<Page<'_>, AzureError> {
    serde_json::from_slice(body)
        .map_err(|e| AzureError::InvalidResponse(format!("a list of NSGs: {e}")))
}

/// A list's page as Azure sent it: checked, its next link read, its NSGs left as text until
/// [`NsgPage::nsgs`] asks. A page of a hundred large NSGs is megabytes: only the NSGs a caller
/// needs are ever parsed or copied.
pub fn page_of_nsgs(body: bytes::Bytes) -> Result<NsgPage, AzureError> {
    let next = read_page(&body)?.next_link.filter(|l| !l.is_empty());
    Ok(NsgPage { body, next })
}

/// Each NSG of a page checked by [`page_of_nsgs`], named by its id.
pub fn nsgs_of_page(body: &[u8]) -> Result<Vec<ListedNsg<'_>>, AzureError> {
    #[derive(Deserialize)]
    struct Id {
        #[serde(default)]
        id: Option<String>,
    }
    read_page(body)?
        .value
        .into_iter()
        .map(|raw| {
            let Id { id } = serde_json::from_str(raw.get())
                .map_err(|e| AzureError::InvalidResponse(format!("an NSG in a list: {e}")))?;
            let nsg_id = id.ok_or_else(|| {
                AzureError::InvalidResponse("an NSG in a list has no id".to_string())
            })?;
            Ok(ListedNsg { nsg_id, raw })
        })
        .collect()
}

/// One NSG of a list's page, still as text.
pub struct ListedNsg<'a> {
    pub nsg_id: String,
    raw: &'a RawValue,
}

impl ListedNsg<'_> {
    /// Its user security rules, parsed as [`super::NetworkApi::read_nsg`] parses them.
    pub fn rules(&self) -> Result<Vec<NsgRule>, AzureError> {
        Ok(read_nsg_text(self.raw, &self.nsg_id)?.rules)
    }

    /// The NSG as a read of it alone gives it (etag, rules, text).
    pub fn snapshot(&self) -> Result<NsgSnapshot, AzureError> {
        let parsed = read_nsg_text(self.raw, &self.nsg_id)?;
        Ok(NsgSnapshot {
            nsg_id: self.nsg_id.clone(),
            etag: parsed.etag,
            rules: parsed.rules,
            raw: self.raw.to_owned(),
        })
    }
}

/// `properties.<key>` of the NSG, `None` when absent.
pub fn property(raw: &RawValue, key: &str) -> Result<Option<Value>, AzureError> {
    let (_, mut properties) = split(raw)?;
    properties
        .remove(key)
        .map(|v| parse(&v, "an NSG property"))
        .transpose()
}

/// The NSG with `properties.<key>` set to `value`, every other field as read.
pub fn with_property(
    raw: &RawValue,
    key: &str,
    value: &Value,
) -> Result<Box<RawValue>, AzureError> {
    let value = encode(value, "an NSG property")?;
    with_properties(raw, |properties| {
        properties.insert(key.to_string(), value);
        Ok(())
    })
}

/// The body of a whole-NSG PUT: `raw` as read, with `deletes` dropped and `puts` added or put
/// in place of the rule of the same name (names compared case-insensitively; a name in both
/// lists is put). Everything else, unknown fields included, is sent back as read: ARM ignores
/// the read-only fields (`etag`, `provisioningState`, `defaultSecurityRules`...) on a PUT.
pub fn put_body(
    raw: &RawValue,
    deletes: &[String],
    puts: &[NsgRule],
) -> Result<Vec<u8>, AzureError> {
    let body = with_properties(raw, |properties| {
        let existing: Vec<Box<RawValue>> = match properties.remove("securityRules") {
            None => Vec::new(),
            Some(list) if list.get() == "null" => Vec::new(),
            Some(list) => serde_json::from_str(list.get()).map_err(|_| {
                AzureError::InvalidInput("the NSG's securityRules are not a list".into())
            })?,
        };
        let mut pending: Vec<Option<Box<RawValue>>> = puts
            .iter()
            .map(|r| encode(&to_model(r), &format!("rule {}", r.name)).map(Some))
            .collect::<Result<_, _>>()?;
        let mut rules = Vec::with_capacity(existing.len() + puts.len());
        for rule in existing {
            let name = serde_json::from_str::<Named>(rule.get())
                .ok()
                .and_then(|n| n.name)
                .unwrap_or_default();
            if let Some(i) = puts.iter().position(|p| p.name.eq_ignore_ascii_case(&name)) {
                if let Some(new) = pending.get_mut(i).and_then(Option::take) {
                    rules.push(new);
                }
                continue;
            }
            if !deletes.iter().any(|d| d.eq_ignore_ascii_case(&name)) {
                rules.push(rule);
            }
        }
        rules.extend(pending.into_iter().flatten());
        properties.insert("securityRules".into(), encode(&rules, "the rules")?);
        Ok(())
    })?;
    Ok(Box::<str>::from(body).into_string().into_bytes())
}

/// `raw` with its `properties` (an empty object if absent) changed by `edit`.
fn with_properties(
    raw: &RawValue,
    edit: impl FnOnce(&mut Fields) -> Result<(), AzureError>,
) -> Result<Box<RawValue>, AzureError> {
    let (mut top, mut properties) = split(raw)?;
    edit(&mut properties)?;
    top.insert(
        "properties".into(),
        encode(&properties, "the NSG's properties")?,
    );
    encode(&top, "the NSG")
}

/// A JSON object's fields, each value kept as its text.
type Fields = BTreeMap<String, Box<RawValue>>;

/// The NSG's top-level fields, and its `properties` taken out of them (empty if absent).
fn split(raw: &RawValue) -> Result<(Fields, Fields), AzureError> {
    let mut top = object(raw, "the NSG snapshot is not a JSON object")?;
    let properties = match top.remove("properties") {
        None => BTreeMap::new(),
        Some(p) => object(&p, "the NSG's properties are not an object")?,
    };
    Ok((top, properties))
}

fn object(raw: &RawValue, not_one: &str) -> Result<Fields, AzureError> {
    serde_json::from_str(raw.get()).map_err(|_| AzureError::InvalidInput(not_one.to_string()))
}

fn parse(raw: &RawValue, what: &str) -> Result<Value, AzureError> {
    serde_json::from_str(raw.get())
        .map_err(|e| AzureError::InvalidResponse(format!("{what} does not parse: {e}")))
}

fn encode(value: &impl serde::Serialize, what: &str) -> Result<Box<RawValue>, AzureError> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| AzureError::InvalidInput(format!("cannot encode {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::rule::{Access, Direction, RuleProtocol};

    fn raw(value: Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).unwrap()
    }

    fn json(raw: &[u8]) -> Value {
        serde_json::from_slice(raw).unwrap()
    }

    fn rule(name: &str, port: &str) -> NsgRule {
        NsgRule {
            name: name.into(),
            description: String::new(),
            priority: 100,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol: RuleProtocol::Tcp,
            source_address_prefixes: vec!["203.0.113.7/32".into()],
            source_port_ranges: vec!["*".into()],
            destination_address_prefixes: vec!["10.0.0.4".into()],
            destination_port_ranges: vec![port.into()],
            provisioning_failed: false,
        }
    }

    #[test]
    fn the_put_body_changes_only_the_named_rules() {
        let read = serde_json::json!({
            "name": "n", "etag": "W/\"1\"", "location": "westeurope", "tags": {"a": "b"},
            "properties": {
                "flushConnection": true,
                "futureThing": {"x": [1, 2.5, null]},
                "securityRules": [
                    {"name": "Foreign", "properties": {"priority": 300, "unknownField": 7}},
                    {"name": "MINE-1", "properties": {"priority": 100}},
                    {"name": "mine-2", "properties": {"priority": 101}},
                ]
            }
        });
        let body = json(
            &put_body(
                &raw(read.clone()),
                &["mine-2".to_string()],
                &[rule("mine-1", "22"), rule("mine-3", "80")],
            )
            .unwrap(),
        );
        let rules = body["properties"]["securityRules"].as_array().unwrap();
        let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, vec!["Foreign", "mine-1", "mine-3"]);
        assert_eq!(
            rules[0], read["properties"]["securityRules"][0],
            "kept verbatim"
        );
        assert_eq!(rules[1]["properties"]["destinationPortRange"], "22");
        assert_eq!(
            body["properties"]["futureThing"],
            read["properties"]["futureThing"]
        );
        assert_eq!(body["properties"]["flushConnection"], true);
        assert_eq!(body["tags"], read["tags"]);
        assert_eq!(body["location"], "westeurope");

        // No rules at all: the puts become the list.
        let empty = raw(serde_json::json!({"location": "l", "properties": {}}));
        let body = json(&put_body(&empty, &[], &[rule("a", "1")]).unwrap());
        assert_eq!(body["properties"]["securityRules"][0]["name"], "a");
        assert!(put_body(&raw(serde_json::json!([])), &[], &[]).is_err());
        let not_a_list = raw(serde_json::json!({"properties": {"securityRules": 3}}));
        assert!(put_body(&not_a_list, &[], &[]).is_err());
    }

    #[test]
    fn the_etag_and_rules_are_read_and_a_property_set_keeps_the_rest() {
        let read = raw(serde_json::json!({
            "etag": "W/\"7\"",
            "properties": {
                "securityRules": [{"name": "r1", "properties": {
                    "priority": 200, "access": "Allow", "direction": "Inbound", "protocol": "Tcp",
                    "sourceAddressPrefix": "*", "sourcePortRange": "*",
                    "destinationAddressPrefix": "*", "destinationPortRange": "22"}}],
                "someFieldNoModelKnows": {"x": [1, 2.5, null]}
            },
            "tags": {"team": "net"}
        }));
        let (etag, rules) = etag_and_rules(&read, "nsg").unwrap();
        assert_eq!(etag.as_deref(), Some("W/\"7\""));
        assert_eq!(rules.len(), 1);
        assert_eq!((rules[0].name.as_str(), rules[0].priority), ("r1", 200));

        assert_eq!(property(&read, "flushConnection").unwrap(), None);
        let flushed = with_property(&read, "flushConnection", &Value::Bool(true)).unwrap();
        assert_eq!(
            property(&flushed, "flushConnection").unwrap(),
            Some(Value::Bool(true))
        );
        let (before, after) = (json(read.get().as_bytes()), json(flushed.get().as_bytes()));
        assert_eq!(after["tags"], before["tags"]);
        assert_eq!(
            after["properties"]["someFieldNoModelKnows"],
            before["properties"]["someFieldNoModelKnows"]
        );
        assert_eq!(
            after["properties"]["securityRules"],
            before["properties"]["securityRules"]
        );

        let no_rules = raw(serde_json::json!({"properties": {"securityRules": null}}));
        assert_eq!(
            etag_and_rules(&no_rules, "nsg").unwrap(),
            (None, Vec::new())
        );
        let not_a_list = raw(serde_json::json!({"properties": {"securityRules": {}}}));
        assert!(etag_and_rules(&not_a_list, "nsg").is_err());
    }

    /// A page is read lazily: an NSG whose rules do not parse spoils only itself, found when
    /// its rules are asked for; a page or an NSG without an id is refused whole.
    #[test]
    fn a_page_names_its_nsgs_and_parses_one_only_when_asked() {
        let page = |value: Value| bytes::Bytes::from(serde_json::to_vec(&value).unwrap());
        let good = serde_json::json!({"id": "/n/1", "etag": "W/\"1\"", "properties": {
            "securityRules": [{"name": "r1", "properties": {
                "priority": 200, "access": "Allow", "direction": "Inbound", "protocol": "Tcp",
                "sourceAddressPrefix": "*", "sourcePortRange": "*",
                "destinationAddressPrefix": "*", "destinationPortRange": "22"}}]}});
        let spoilt = serde_json::json!({"id": "/n/2", "properties": {"securityRules": {}}});
        let read = page_of_nsgs(page(serde_json::json!({
            "value": [good, spoilt], "nextLink": "https://arm/next"
        })))
        .unwrap();
        assert_eq!(read.next.as_deref(), Some("https://arm/next"));
        let nsgs = read.nsgs().unwrap();
        let ids: Vec<_> = nsgs.iter().map(|n| n.nsg_id.as_str()).collect();
        assert_eq!(ids, ["/n/1", "/n/2"]);
        let first = nsgs[0].snapshot().unwrap();
        assert_eq!(first.etag.as_deref(), Some("W/\"1\""));
        assert_eq!(first.rules, nsgs[0].rules().unwrap());
        assert_eq!(json(first.raw.get().as_bytes())["id"], "/n/1");
        assert!(nsgs[1].rules().is_err());

        let last = page_of_nsgs(page(serde_json::json!({"value": [], "nextLink": ""}))).unwrap();
        assert_eq!(last.next, None);
        let no_id = page_of_nsgs(page(serde_json::json!({"value": [{"properties": {}}]})));
        assert!(no_id.unwrap().nsgs().is_err());
        assert!(page_of_nsgs(page(serde_json::json!({"value": {}}))).is_err());
    }
}
