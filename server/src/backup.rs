//! `sglang-server backup create|restore|list|delete`: backups of a running server, made
//! through its admin routes (with the admin key).
//!
//! A backup is a directory `BACKUP_DIR/NAME/` with the server's configuration (`GET /config`,
//! keys redacted by the server), the model's identity (`POST /admin/checkpoint`: path, config,
//! sha256 of each file; the files themselves only with `--include-model`), the radix cache's
//! token prefixes (`GET /admin/cache/state`) and a `manifest.json` with the sha256 of each of
//! these files. It is written under a temporary name and renamed when complete, and only then
//! added to `BACKUP_DIR/backup_metadata.json`, itself replaced atomically (temporary file,
//! fsync, rename): an interrupted `create` leaves no entry in `list`. `restore` checks every
//! file against the manifest, refuses a server that serves a different model (unless
//! `--force`), reports configuration that differs (start-up options: they need a restart), and
//! re-warms the cache with `POST /admin/cache/state`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde_json::{json, Value};

use crate::http::admin_sha256_file as sha256_file;

const METADATA: &str = "backup_metadata.json";
const MANIFEST: &str = "manifest.json";

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The server to back up or restore into.
    #[arg(
        long,
        env = "SGLANG_SERVER_URL",
        default_value = "http://127.0.0.1:30000"
    )]
    pub server_url: String,
    /// Directory holding the backups and backup_metadata.json.
    #[arg(long, default_value = "./backups")]
    pub backup_dir: PathBuf,
    /// The server's admin key (never printed).
    #[arg(long, env = "SGLANG_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Back up a running server.
    Create {
        #[command(flatten)]
        common: Common,
        /// Name of the backup (default: backup_ and the Unix time in seconds).
        #[arg(long)]
        backup_name: Option<String>,
        /// Also copy the model files (the server's model directory must be readable here).
        #[arg(long)]
        include_model: bool,
    },
    /// Restore a backup into a running server (model check, cache re-warm).
    Restore {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        backup_name: String,
        /// Restore even if the server serves a different model.
        #[arg(long)]
        force: bool,
    },
    /// List the backups (JSON).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Delete a backup.
    Delete {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        backup_name: String,
    },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One HTTP/1.1 request to the server; returns the status and the JSON body.
pub fn call(
    c: &Common,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let uri: hyper::Uri = c
        .server_url
        .parse()
        .map_err(|e| format!("invalid --server-url {:?}: {e}", c.server_url))?;
    if uri.scheme_str().is_some_and(|s| s != "http") {
        return Err(format!(
            "--server-url {}: only http:// is supported",
            c.server_url
        ));
    }
    let host = uri
        .host()
        .ok_or(format!("--server-url {}: no host", c.server_url))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let base = uri.path().trim_end_matches('/').to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot reach {}: {e}", c.server_url))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let data = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("host", format!("{host}:{port}"))
            .header("content-type", "application/json");
        if let Some(k) = &c.admin_api_key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(600),
            sender.send_request(req),
        )
        .await
        .map_err(|_| format!("{path}: no answer within 600 s"))?
        .map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status != 200 {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            return Err(format!("{path} answered {status}: {msg}"));
        }
        Ok((status, v))
    })
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync, rename.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<(), String> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    write_atomic(
        path,
        serde_json::to_string_pretty(v)
            .unwrap_or_default()
            .as_bytes(),
    )
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))
}

fn load_metadata(dir: &Path) -> Result<Vec<Value>, String> {
    let path = dir.join(METADATA);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let v = read_json(&path)?;
    Ok(v["backups"].as_array().cloned().unwrap_or_default())
}

fn save_metadata(dir: &Path, backups: &[Value]) -> Result<(), String> {
    write_json(&dir.join(METADATA), &json!({"backups": backups}))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid --backup-name {name:?}: letters, digits, '-', '_' and '.' only, not starting with '.'"))
    }
}

/// Checks every file the manifest lists; returns the manifest.
fn verify(backup: &Path) -> Result<Value, String> {
    let manifest =
        read_json(&backup.join(MANIFEST)).map_err(|e| format!("backup is damaged: {e}"))?;
    for f in manifest["files"]
        .as_array()
        .ok_or("backup is damaged: the manifest lists no files")?
    {
        let rel = f["path"]
            .as_str()
            .ok_or("backup is damaged: a manifest entry has no path")?;
        let path = backup.join(rel);
        let sha = sha256_file(&path)
            .map_err(|e| format!("backup is damaged: {}: {e}", path.display()))?;
        if Some(sha.as_str()) != f["sha256"].as_str() {
            return Err(format!(
                "backup is damaged: {} does not match its checksum",
                path.display()
            ));
        }
    }
    Ok(manifest)
}

fn create(c: &Common, name: Option<String>, include_model: bool) -> Result<Value, String> {
    let dir = &c.backup_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = name.unwrap_or_else(|| format!("backup_{}", now()));
    check_name(&name)?;
    let mut backups = load_metadata(dir)?;
    if backups.iter().any(|b| b["name"] == name.as_str()) {
        return Err(format!("a backup named {name:?} exists already"));
    }
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        return Err(format!("{} exists but is not in {METADATA} (an interrupted create?): `delete --backup-name {name}` removes it", final_dir.display()));
    }
    // leftovers of interrupted runs
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.contains(".partial-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let result = (|| -> Result<Value, String> {
        let (_, config) = call(c, Method::GET, "/config", None)?;
        write_json(&tmp.join("config/server_config.json"), &config)?;
        let (_, checkpoint) = call(c, Method::POST, "/admin/checkpoint", Some(&json!({})))?;
        write_json(&tmp.join("model/checkpoint.json"), &checkpoint)?;
        if include_model {
            let src = PathBuf::from(checkpoint["model_path"].as_str().unwrap_or_default());
            for f in checkpoint["files"].as_array().cloned().unwrap_or_default() {
                let fname = f["name"].as_str().unwrap_or_default();
                let to = tmp.join("model/files").join(fname);
                std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
                std::fs::copy(src.join(fname), &to)
                    .map_err(|e| format!("--include-model: cannot copy {} (is the model directory readable here?): {e}", src.join(fname).display()))?;
                if sha256_file(&to).map_err(|e| e.to_string())?.as_str()
                    != f["sha256"].as_str().unwrap_or_default()
                {
                    return Err(format!(
                        "--include-model: {fname} changed while it was copied"
                    ));
                }
            }
        }
        let (_, cache) = call(c, Method::GET, "/admin/cache/state", None)?;
        write_json(&tmp.join("cache/cache_state.json"), &cache)?;
        let mut files = Vec::new();
        let mut size = 0u64;
        let mut stack = vec![tmp.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(|e| e.to_string())?.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                    size += bytes;
                    let rel = p.strip_prefix(&tmp).unwrap().to_string_lossy().into_owned();
                    files.push(json!({"path": rel, "bytes": bytes, "sha256": sha256_file(&p).map_err(|e| e.to_string())?}));
                }
            }
        }
        files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
        let entry = json!({
            "name": name,
            "created": now(),
            "server_url": c.server_url,
            "size": size,
            "includes_model": include_model,
            "model_path": checkpoint["model_path"],
            "served_model_name": checkpoint["served_model_name"],
            "cached_prefixes": cache["num_prefixes"],
            "cached_tokens": cache["cached_tokens"],
        });
        let mut manifest = entry.clone();
        manifest["files"] = Value::Array(files);
        write_json(&tmp.join(MANIFEST), &manifest)?;
        Ok(entry)
    })();
    let entry = match result {
        Ok(e) => e,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &final_dir).map_err(|e| format!("{}: {e}", final_dir.display()))?;
    backups.push(entry.clone());
    save_metadata(dir, &backups)?;
    Ok(entry)
}

fn restore(c: &Common, name: &str, force: bool) -> Result<Value, String> {
    check_name(name)?;
    let backups = load_metadata(&c.backup_dir)?;
    let path = c.backup_dir.join(name);
    if !backups.iter().any(|b| b["name"] == name) {
        return Err(if path.exists() {
            format!(
                "{} is not a complete backup (not in {METADATA}; an interrupted create?)",
                path.display()
            )
        } else {
            format!("no backup named {name:?} in {}", c.backup_dir.display())
        });
    }
    verify(&path)?;
    let saved = read_json(&path.join("model/checkpoint.json"))?;
    let (_, current) = call(c, Method::POST, "/admin/checkpoint", Some(&json!({})))?;
    let weights = |v: &Value| -> Vec<(String, String)> {
        let mut w: Vec<(String, String)> = v["files"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|f| {
                f["name"].as_str().is_some_and(|n| {
                    n.ends_with(".safetensors") || n == "config.json" || n == "tokenizer.json"
                })
            })
            .map(|f| {
                (
                    f["name"].as_str().unwrap_or_default().to_string(),
                    f["sha256"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        w.sort();
        w
    };
    let same_model = weights(&saved) == weights(&current);
    if !same_model && !force {
        return Err(format!(
            "the server serves a different model ({}) than the backup ({}): restore with --force to warm its cache anyway",
            current["model_path"], saved["model_path"]
        ));
    }
    // Start-up options cannot change in a running server: report what differs.
    let saved_cfg = read_json(&path.join("config/server_config.json"))?;
    let (_, current_cfg) = call(c, Method::GET, "/config", None)?;
    let mut differs = Vec::new();
    if let (Some(a), Some(b)) = (saved_cfg.as_object(), current_cfg.as_object()) {
        for (k, v) in a {
            if k != "port" && k != "host" && b.get(k) != Some(v) {
                differs.push(json!({"option": k, "backup": v, "server": b.get(k)}));
            }
        }
    }
    let cache = read_json(&path.join("cache/cache_state.json"))?;
    let warmed = if cache["num_prefixes"].as_u64().unwrap_or(0) > 0 {
        let (_, r) = call(
            c,
            Method::POST,
            "/admin/cache/state",
            Some(&json!({"prefixes": cache["prefixes"]})),
        )?;
        r
    } else {
        json!({"warmed": 0, "prefix_tokens": 0})
    };
    Ok(json!({
        "restored": name,
        "same_model": same_model,
        "cache": warmed,
        "config_differences": differs,
        "note": "configuration options are set at start-up: restart the server with the backed-up values to apply the differences listed",
    }))
}

fn list(c: &Common) -> Result<Value, String> {
    let backups = load_metadata(&c.backup_dir)?;
    let shown: Vec<Value> = backups
        .into_iter()
        .map(|mut b| {
            let name = b["name"].as_str().unwrap_or_default().to_string();
            b["status"] = json!(match verify(&c.backup_dir.join(&name)) {
                Ok(_) => "ok".to_string(),
                Err(e) => e,
            });
            b
        })
        .collect();
    Ok(json!({"total_count": shown.len(), "backups": shown}))
}

fn delete(c: &Common, name: &str) -> Result<Value, String> {
    check_name(name)?;
    let mut backups = load_metadata(&c.backup_dir)?;
    let before = backups.len();
    backups.retain(|b| b["name"] != name);
    let path = c.backup_dir.join(name);
    if before == backups.len() && !path.exists() {
        return Err(format!(
            "no backup named {name:?} in {}",
            c.backup_dir.display()
        ));
    }
    save_metadata(&c.backup_dir, &backups)?;
    if path.exists() {
        std::fs::remove_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(json!({"deleted": name}))
}

pub fn run(a: BackupArgs) -> Result<(), String> {
    let out = match a.action {
        Action::Create {
            common,
            backup_name,
            include_model,
        } => create(&common, backup_name, include_model)?,
        Action::Restore {
            common,
            backup_name,
            force,
        } => restore(&common, &backup_name, force)?,
        Action::List { common } => list(&common)?,
        Action::Delete {
            common,
            backup_name,
        } => delete(&common, &backup_name)?,
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}
