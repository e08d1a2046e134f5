//! How the client subcommands reach a server: plaintext or TLS (optionally with a client
//! certificate for mutual TLS), and a bearer token.

use std::path::PathBuf;

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, TokenInterceptor>;

impl ConnectArgs {
    /// An endpoint with the TLS settings and the windows large volumes need.
    pub fn endpoint(&self) -> Result<Endpoint, BoxError> {
        let mut ep = Endpoint::from_shared(self.server.clone())
            .map_err(|e| format!("--server {}: {e}", self.server))?
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            // Lets the server send a chunk in one DATA frame (one write) instead of 16 KiB ones.
            .max_frame_size(Some(crate::server::HTTP2_MAX_FRAME))
            .tcp_nodelay(true);
        let tls = self.server.starts_with("https://");
        if tls {
            let mut cfg = ClientTlsConfig::new();
            if let Some(ca) = &self.tls_ca {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
                cfg = cfg.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(c), Some(k)) = (&self.tls_client_cert, &self.tls_client_key) {
                let cert = std::fs::read(c)
                    .map_err(|e| format!("--tls-client-cert {}: {e}", c.display()))?;
                let key = std::fs::read(k)
                    .map_err(|e| format!("--tls-client-key {}: {e}", k.display()))?;
                cfg = cfg.identity(Identity::from_pem(cert, key));
            }
            if let Some(d) = &self.tls_domain {
                cfg = cfg.domain_name(d.clone());
            }
            ep = ep
                .tls_config(cfg)
                .map_err(|e| format!("--server {}: TLS: {e}", self.server))?;
        } else if self.tls_ca.is_some() || self.tls_client_cert.is_some() {
            return Err(format!(
                "--server: TLS options need an https:// URL, got {}",
                self.server
            )
            .into());
        }
        Ok(ep)
    }

    pub async fn channel(&self) -> Result<Channel, BoxError> {
        self.endpoint()?
            .connect()
            .await
            .map_err(|e| format!("{}: {e}", self.server).into())
    }

    pub fn interceptor(&self) -> Result<TokenInterceptor, BoxError> {
        let v = match &self.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| "--token: expected printable ASCII")?,
            ),
            None => None,
        };
        Ok(TokenInterceptor(v))
    }

    /// An Inference client on `channel` that sends the token.
    pub fn inference(&self, channel: Channel) -> Result<InferenceClient<Authed>, BoxError> {
        Ok(
            InferenceClient::with_interceptor(channel, self.interceptor()?)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
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
    println!("{}", crate::security::token_line(&a.id, &token));
    Ok(())
}
