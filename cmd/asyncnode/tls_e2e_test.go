package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// writeTLSFiles writes a CA and a certificate for 127.0.0.1 signed by it
// (PEM) into dir and returns their paths.
func writeTLSFiles(t *testing.T, dir string) (ca, cert, key string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	nodeKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	nodeTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "node"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	nodeDER, err := x509.CreateCertificate(rand.Reader, nodeTmpl, caCert, &nodeKey.PublicKey, caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalECPrivateKey(nodeKey)
	require.NoError(t, err)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
		return p
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("node.pem", "CERTIFICATE", nodeDER), write("node.key", "EC PRIVATE KEY", keyDER)
}

// TestCLIOverTLS runs a node whose Raft and API use TLS: status works with
// --tls-ca and is refused without it or with the wrong CA.
func TestCLIOverTLS(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	dir := t.TempDir()
	ca, cert, key := writeTLSFiles(t, dir)
	other, _, _ := writeTLSFiles(t, t.TempDir())
	n := newNode(t, dsn, "n1", "--voters", "1", "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca)
	n.start()
	require.Eventually(t, func() bool {
		out, _, code := runCLI(t, nil, "status", "--http-addr", n.api, "--tls-ca", ca)
		return code == 0 && strings.Contains(out, "leader n1")
	}, 60*time.Second, 200*time.Millisecond, "status over TLS never showed the leader")
	_, errOut, code := runCLI(t, nil, "status", "--http-addr", n.api)
	require.Equal(t, 1, code, "plain HTTP to a TLS API must fail")
	_, errOut, code = runCLI(t, nil, "status", "--http-addr", n.api, "--tls-ca", other)
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "certificate")
	_, errOut, code = runCLI(t, nil, "status", "--http-addr", n.api, "--tls-ca", filepath.Join(dir, "missing.pem"))
	require.Equal(t, 2, code, errOut)
}
