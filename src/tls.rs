//! TLS (PROTOCOL §4): this server's self-signed certificate, the `/trust` proof, and
//! client verifiers: one that accepts exactly a pinned certificate (byte for byte, host
//! names ignored since addresses change) and one that records whatever certificate a
//! server presents, for the `/trust` fetch. Both still check the handshake signature,
//! so only the holder of the certificate's key gets through.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::credentials::hmac_sha256;
use crate::proto;
use crate::util::{self, hex};

/// This server's certificate and key.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads `<state_dir>/tls/{cert,key}.pem`, making them on first start.
pub fn load_or_create(state_dir: &Path, name: &str) -> Result<Identity, String> {
    let dir = state_dir.join(proto::TLS_DIR);
    let (cert_path, key_path) = (dir.join(proto::CERT_FILE), dir.join(proto::KEY_FILE));
    if cert_path.exists() || key_path.exists() {
        let read = |p: &PathBuf| {
            fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let cert_der = pem_to_der(&cert_pem)
            .ok_or_else(|| format!("{} holds no certificate", cert_path.display()))?;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("{} holds no usable key: {e}", key_path.display()))?;
        return Ok(Identity {
            cert_pem,
            cert_der,
            key_pem,
        });
    }
    util::ensure_dir(&dir, 0o700).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let id = generate(name)?;
    util::write_atomic(&key_path, id.key_pem.as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
    util::write_atomic(&cert_path, id.cert_pem.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    log::info!("made a new TLS certificate in {}", dir.display());
    Ok(id)
}

/// A fresh ECDSA P-256 end-entity certificate; SANs: host name, `localhost`, our IPs.
pub fn generate(name: &str) -> Result<Identity, String> {
    let mut sans = vec!["localhost".to_string()];
    let host = util::hostname();
    if rcgen::CertificateParams::new(vec![host.clone()]).is_ok() {
        sans.insert(0, host);
    }
    sans.extend(
        crate::beacon::ipv4_addrs()
            .into_iter()
            .map(|(_, a)| a.to_string()),
    );
    sans.dedup();
    let mut params =
        rcgen::CertificateParams::new(sans).map_err(|e| format!("certificate names: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("krill {name}"));
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("key generation: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("certificate: {e}"))?;
    Ok(Identity {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
    })
}

pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

/// `hex(HMAC-SHA256(trust_key, installId || "\n" || SHA-256(cert DER)))`.
pub fn proof(trust_key: &[u8], install_id: &str, cert_der: &[u8]) -> String {
    let digest = Sha256::digest(cert_der);
    hex(&hmac_sha256(
        trust_key,
        &[install_id.as_bytes(), b"\n", digest.as_slice()],
    ))
}

pub fn check_proof(trust_key: &[u8], install_id: &str, cert_der: &[u8], given: &str) -> bool {
    util::ct_eq(
        proof(trust_key, install_id, cert_der).as_bytes(),
        given.to_ascii_lowercase().as_bytes(),
    )
}

/// The file a peer's pinned certificate lives in.
pub fn pin_path(state_dir: &Path, install_id: &str) -> PathBuf {
    state_dir
        .join(proto::PEERS_DIR)
        .join(format!("{install_id}.pem"))
}

/// The pinned certificate (DER) for `install_id`, if any.
pub fn load_pin(state_dir: &Path, install_id: &str) -> Option<Vec<u8>> {
    fs::read_to_string(pin_path(state_dir, install_id))
        .ok()
        .and_then(|p| pem_to_der(&p))
}

pub fn save_pin(state_dir: &Path, install_id: &str, cert_pem: &str) -> Result<(), String> {
    let p = pin_path(state_dir, install_id);
    if let Some(dir) = p.parent() {
        util::ensure_dir(dir, 0o700)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    util::write_atomic(&p, cert_pem.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", p.display()))
}

/// Accepts exactly one certificate: the pinned one, or (made with [`Verifier::first_seen`])
/// whichever the first handshake presents, and from then on only that one. Signatures
/// are always verified, so only the holder of the certificate's key gets through.
#[derive(Debug)]
pub struct Verifier {
    pinned: Mutex<Option<Vec<u8>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl Verifier {
    pub fn pinned(der: Vec<u8>) -> Arc<Verifier> {
        Arc::new(Verifier {
            pinned: Mutex::new(Some(der)),
            algs: provider().signature_verification_algorithms,
        })
    }

    /// Trust on first use within one client: the `/trust` fetch of a peer session
    /// learns the certificate, checks its proof, and every later connection of the
    /// same client must present that same certificate.
    pub fn first_seen() -> Arc<Verifier> {
        Arc::new(Verifier {
            pinned: Mutex::new(None),
            algs: provider().signature_verification_algorithms,
        })
    }

    /// The certificate this verifier accepts (none yet for a fresh `first_seen`).
    pub fn seen(&self) -> Option<Vec<u8>> {
        self.pinned.lock().clone()
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut pinned = self.pinned.lock();
        match pinned.as_deref() {
            Some(p) if p != end_entity.as_ref() => Err(rustls::Error::General(
                "certificate is not the pinned one".into(),
            )),
            Some(_) => Ok(ServerCertVerified::assertion()),
            None => {
                *pinned = Some(end_entity.to_vec());
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A blocking HTTPS client that trusts only what `verifier` accepts.
pub fn agent(verifier: Arc<Verifier>, dial: Duration, read: Duration) -> ureq::Agent {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // A client lives for one peer session and talks to one server: room for a couple
    // of resumable sessions is plenty (the default store preallocates 256 entries,
    // 15 KiB per client, a few percent of an idle server's memory with 15 peers).
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(2);
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(cfg))
        .timeout_connect(dial)
        .timeout_read(read)
        .timeout_write(read.max(dial))
        .redirects(0)
        .max_idle_connections_per_host(2)
        .user_agent(concat!("krill/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_known_answer() {
        // Computed independently with Python's hmac/hashlib from PROTOCOL §4.
        let tk = util::unhex("7e34f239a1cbbd501b1e78303f46af7523e956768386bd88356cbfe7a98d33e1")
            .unwrap();
        let id = "11111111-2222-4333-8444-555555555555";
        let p = proof(&tk, id, b"fake certificate der");
        assert_eq!(
            p,
            "cfee59bcfa3d8724ea5811268969bff1600efcf94dd26dfd062ba070d5f7b0ef"
        );
        assert!(check_proof(&tk, id, b"fake certificate der", &p));
        assert!(!check_proof(&tk, id, b"other der", &p));
        assert!(!check_proof(
            &tk,
            "11111111-2222-4333-8444-555555555556",
            b"fake certificate der",
            &p
        ));
    }

    #[test]
    fn certificate_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("krill-tls-{}", util::uuid_v4()));
        let a = load_or_create(&dir, "t").unwrap();
        let b = load_or_create(&dir, "t").unwrap();
        assert_eq!(a.cert_der, b.cert_der);
        assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(pem_to_der(&a.cert_pem).unwrap(), a.cert_der);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pins_round_trip() {
        let dir = std::env::temp_dir().join(format!("krill-pin-{}", util::uuid_v4()));
        let id = generate("x").unwrap();
        assert!(load_pin(&dir, "abc").is_none());
        save_pin(&dir, "abc", &id.cert_pem).unwrap();
        assert_eq!(load_pin(&dir, "abc").unwrap(), id.cert_der);
        fs::remove_dir_all(&dir).unwrap();
    }
}
