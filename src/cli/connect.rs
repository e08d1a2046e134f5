//! The connection flags of the client subcommands (the connecting is `crate::client`'s) and
//! `voxconv token`.

use std::path::PathBuf;

use clap::Args;
use tonic::transport::Channel;

pub use crate::client::connect::{Authed, ConnectOptions, TokenInterceptor};
use crate::proto::voxconv::v1::inference_client::InferenceClient;

type BoxError = Box<dyn std::error::Error>;

#[derive(Clone, Debug, Args)]
pub struct ConnectArgs {
    /// Server URL: http://HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(long, env = "VOXCONV_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Bearer token sent as `authorization` metadata (servers with --auth-tokens).
    #[arg(long, env = "VOXCONV_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify an https:// server with (default: the system roots
    /// are not loaded; give the CA that signed the server's certificate).
    #[arg(long, env = "VOXCONV_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "VOXCONV_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "VOXCONV_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Server name to verify in its certificate (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
}

impl ConnectArgs {
    /// The connection settings these flags give.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions {
            server: self.server.clone(),
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_client_cert: self.tls_client_cert.clone(),
            tls_client_key: self.tls_client_key.clone(),
            tls_domain: self.tls_domain.clone(),
        }
    }

    pub async fn channel(&self) -> Result<Channel, BoxError> {
        self.options().channel().await
    }

    pub fn interceptor(&self) -> Result<TokenInterceptor, BoxError> {
        self.options().interceptor()
    }

    /// An Inference client on `channel` that sends the token.
    pub fn inference(&self, channel: Channel) -> Result<InferenceClient<Authed>, BoxError> {
        self.options().inference(channel)
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Caller id to put in the token file and the audit log (e.g. the pipeline's name).
    #[arg(long)]
    pub id: String,
    /// Read the token from stdin instead of generating a random one.
    #[arg(long)]
    pub stdin: bool,
}

/// `voxconv token --id ID`: a new random token (printed once) and its token-file line.
pub fn token(a: TokenArgs) -> Result<(), BoxError> {
    if a.id.is_empty() || a.id.contains(char::is_whitespace) {
        return Err(format!("--id: expected a name without spaces, got {:?}", a.id).into());
    }
    let token = if a.stdin {
        let mut s = String::new();
        std::io::stdin().read_line(&mut s)?;
        s.trim().to_string()
    } else {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    if token.is_empty() {
        return Err("token: expected a non-empty token on stdin".into());
    }
    if !a.stdin {
        eprintln!(
            "token for {} (give it to the caller; the server stores only its hash):",
            a.id
        );
        eprintln!("{token}");
        eprintln!("line for the --auth-tokens file:");
    }
    println!("{}", crate::auth::token_line(&a.id, &token));
    Ok(())
}
