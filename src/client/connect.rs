//! How a client reaches a server: plaintext or TLS (optionally with a client certificate
//! for mutual TLS), a bearer token, and the HTTP/2 sizes large volumes need. Errors name the
//! command-line flag each setting comes from.

use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::voxconv::v1::inference_client::InferenceClient;
use crate::wire::{HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME, HTTP2_STREAM_WINDOW};

type BoxError = Box<dyn std::error::Error>;

/// Where and how to connect.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// Server URL: http://HOST:PORT, or https://HOST:PORT for TLS.
    pub server: String,
    /// Bearer token sent as `authorization` metadata.
    pub token: Option<String>,
    /// CA certificate (PEM) to verify an https:// server with.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
    /// Server name to verify in its certificate (default: the URL's host).
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

impl ConnectOptions {
    /// An endpoint with the TLS settings and the windows large volumes need.
    pub fn endpoint(&self) -> Result<Endpoint, BoxError> {
        let mut ep = Endpoint::from_shared(self.server.clone())
            .map_err(|e| format!("--server {}: {e}", self.server))?
            .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
            .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
            // Lets the server send a chunk in one DATA frame (one write) instead of 16 KiB ones.
            .max_frame_size(Some(HTTP2_MAX_FRAME))
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
