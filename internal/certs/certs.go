// Package certs makes throwaway TLS certificates for tests: a certificate
// authority, server certificates and client certificates, as PEM files that
// PostgreSQL and pgx read.
package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Validity is how long the certificates made here are valid.
const Validity = 10 * 365 * 24 * time.Hour

// A CA is a certificate authority that issues certificates.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA makes a self-signed certificate authority.
func NewCA(name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl, err := template(name)
	if err != nil {
		return nil, err
	}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// CertPEM returns the authority's certificate in PEM.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// A Leaf is a certificate and its private key, in PEM.
type Leaf struct {
	CertPEM []byte
	KeyPEM  []byte
}

// Server issues a certificate for a server reached under the given host
// names and IP addresses.
func (ca *CA) Server(hosts ...string) (Leaf, error) {
	return ca.issue(hosts[0], hosts, x509.ExtKeyUsageServerAuth)
}

// Client issues a client certificate whose subject is CN=name.
func (ca *CA) Client(name string) (Leaf, error) {
	return ca.issue(name, nil, x509.ExtKeyUsageClientAuth)
}

func (ca *CA) issue(name string, hosts []string, usage x509.ExtKeyUsage) (Leaf, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Leaf{}, err
	}
	tmpl, err := template(name)
	if err != nil {
		return Leaf{}, err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{usage}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return Leaf{}, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return Leaf{}, err
	}
	return Leaf{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

func template(name string) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(Validity),
	}, nil
}

// Files are the paths of a set of certificates kept in one directory.
type Files struct {
	CA         string // the authority's certificate
	CAKey      string
	ServerCert string // for the host names given to Ensure
	ServerKey  string
	ClientCert string // CN=pgstore-test-client
	ClientKey  string
}

// Common names of the certificates made by Ensure.
const (
	CAName     = "pgstore test CA"
	ClientName = "pgstore-test-client"
)

// FilesIn returns the paths Ensure uses in dir.
func FilesIn(dir string) Files {
	return Files{
		CA:         filepath.Join(dir, "ca.crt"),
		CAKey:      filepath.Join(dir, "ca.key"),
		ServerCert: filepath.Join(dir, "server.crt"),
		ServerKey:  filepath.Join(dir, "server.key"),
		ClientCert: filepath.Join(dir, "client.crt"),
		ClientKey:  filepath.Join(dir, "client.key"),
	}
}

// Ensure makes sure dir holds a certificate authority, a server certificate
// for serverHosts and a client certificate, all valid for at least a month.
// Files already there that pass are kept as they are, because a server may be
// configured to read them; otherwise all are made anew, each file replaced
// atomically. Directory and files are given to uid and gid (when uid >= 0),
// private keys with mode 0600.
func Ensure(dir string, uid, gid int, serverHosts ...string) (Files, error) {
	f := FilesIn(dir)
	if f.valid(serverHosts) == nil {
		return f, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return f, err
	}
	if uid >= 0 {
		if err := os.Chown(dir, uid, gid); err != nil {
			return f, err
		}
	}
	ca, err := NewCA(CAName)
	if err != nil {
		return f, err
	}
	server, err := ca.Server(serverHosts...)
	if err != nil {
		return f, err
	}
	client, err := ca.Client(ClientName)
	if err != nil {
		return f, err
	}
	caKey, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return f, err
	}
	// Keys before certificates: a server that reloads in between finds a
	// key that does not match and keeps its previous configuration.
	for _, w := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{f.CAKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: caKey}), 0o600},
		{f.CA, ca.CertPEM(), 0o644},
		{f.ServerKey, server.KeyPEM, 0o600},
		{f.ServerCert, server.CertPEM, 0o644},
		{f.ClientKey, client.KeyPEM, 0o600},
		{f.ClientCert, client.CertPEM, 0o644},
	} {
		if err := writeFile(w.path, w.data, w.mode, uid, gid); err != nil {
			return f, err
		}
	}
	return f, f.valid(serverHosts)
}

// valid reports why the files are not a usable set.
func (f Files) valid(serverHosts []string) error {
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return errors.New("no certificate in " + f.CA)
	}
	soon := time.Now().Add(30 * 24 * time.Hour)
	for _, leaf := range []struct {
		cert, key string
		hosts     []string
		usage     x509.ExtKeyUsage
	}{
		{f.ServerCert, f.ServerKey, serverHosts, x509.ExtKeyUsageServerAuth},
		{f.ClientCert, f.ClientKey, []string{""}, x509.ExtKeyUsageClientAuth},
	} {
		pair, err := tls.LoadX509KeyPair(leaf.cert, leaf.key)
		if err != nil {
			return err
		}
		cert, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			return err
		}
		for _, h := range leaf.hosts {
			_, err := cert.Verify(x509.VerifyOptions{
				DNSName: h, Roots: roots, CurrentTime: soon,
				KeyUsages: []x509.ExtKeyUsage{leaf.usage},
			})
			if err != nil {
				return fmt.Errorf("%s: %w", leaf.cert, err)
			}
		}
	}
	return nil
}

// writeFile replaces path atomically.
func writeFile(path string, data []byte, mode os.FileMode, uid, gid int) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename, a no-op
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), mode); err != nil {
		return err
	}
	if uid >= 0 {
		if err := os.Chown(tmp.Name(), uid, gid); err != nil {
			return err
		}
	}
	return os.Rename(tmp.Name(), path)
}
