//go:build unix

package pgstore_test

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/certs"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// TestTLS connects through the connection string's TLS settings to the test
// server, with SSL turned on by the test: it needs a server on this machine,
// a superuser, and to run as root or as the server's user; otherwise it
// skips, saying which is missing. The certificates stay in a directory of the
// server's user (pgstore-test-tls in its home), so that the server can always
// read what its configuration names; the SSL settings are restored when the
// test ends.
func TestTLS(t *testing.T) {
	t.Parallel()
	srv := tlsSetup(t)
	f := srv.files

	// An impostor authority of the same name as the test's: Go's TLS client
	// sends a client certificate only if its issuer has a name that the
	// server asked for, so the server gets to refuse it.
	otherDir := t.TempDir()
	other, err := certs.NewCA(certs.CAName)
	require.NoError(t, err)
	otherCA := filepath.Join(otherDir, "other-ca.crt")
	require.NoError(t, os.WriteFile(otherCA, other.CertPEM(), 0o600))
	otherClient, err := other.Client(certs.ClientName)
	require.NoError(t, err)
	otherCert, otherKey := filepath.Join(otherDir, "impostor.crt"), filepath.Join(otherDir, "impostor.key")
	require.NoError(t, os.WriteFile(otherCert, otherClient.CertPEM, 0o600))
	require.NoError(t, os.WriteFile(otherKey, otherClient.KeyPEM, 0o600))

	t.Run("require", func(t *testing.T) {
		t.Parallel()
		c := connectURL(t, srv.connString("127.0.0.1", "sslmode", "require"), pgtest.Schema(t))
		tlsRequireSession(t, c, true, "")
	})
	t.Run("verify-full", func(t *testing.T) {
		t.Parallel()
		c := connectURL(t, srv.connString("localhost", "sslmode", "verify-full", "sslrootcert", f.CA), pgtest.Schema(t))
		tlsRequireSession(t, c, true, "")
	})
	t.Run("verify-full refuses a host name not in the certificate", func(t *testing.T) {
		t.Parallel()
		// The server's certificate is for localhost only.
		_, err := pgstore.Connect(testCtx(t), srv.connString("127.0.0.1", "sslmode", "verify-full", "sslrootcert", f.CA))
		require.ErrorContains(t, err, "x509: cannot validate certificate for 127.0.0.1")
		// verify-ca checks the chain, not the name.
		c := connectURL(t, srv.connString("127.0.0.1", "sslmode", "verify-ca", "sslrootcert", f.CA), pgtest.Schema(t))
		tlsRequireSession(t, c, true, "")
	})
	t.Run("verify-full refuses an unknown authority", func(t *testing.T) {
		t.Parallel()
		_, err := pgstore.Connect(testCtx(t), srv.connString("localhost", "sslmode", "verify-full", "sslrootcert", otherCA))
		require.ErrorContains(t, err, "certificate signed by unknown authority")
	})
	t.Run("verify-full without sslrootcert checks the system trust store", func(t *testing.T) {
		t.Parallel()
		// The test's authority is in no system store: refused here...
		_, err := pgstore.Connect(testCtx(t), srv.connString("localhost", "sslmode", "verify-full"))
		require.ErrorContains(t, err, "certificate signed by unknown authority")
		// ...and trusted by a process whose system store is that authority
		// alone (Go reads SSL_CERT_FILE once per process, hence another).
		helper := exec.CommandContext(testCtx(t), os.Args[0], "-test.run=^TestTLSSystemTrustStoreHelper$", "-test.v")
		helper.Env = append(os.Environ(), "SSL_CERT_FILE="+f.CA, "SSL_CERT_DIR="+t.TempDir(),
			systemTrustURL+"="+srv.connString("localhost", "sslmode", "verify-full"), systemTrustSchema+"="+pgtest.Schema(t))
		out, err := helper.CombinedOutput()
		require.NoError(t, err, "%s", out)
		require.Contains(t, string(out), "--- PASS: TestTLSSystemTrustStoreHelper", "it ran, and did not skip")
		require.NotContains(t, string(out), "--- SKIP")
	})
	t.Run("disable", func(t *testing.T) {
		t.Parallel()
		c := connectURL(t, srv.connString("127.0.0.1", "sslmode", "disable"), pgtest.Schema(t))
		tlsRequireSession(t, c, false, "")
	})
	t.Run("client certificate", func(t *testing.T) {
		t.Parallel()
		c := connectURL(t, srv.connString("localhost", "sslmode", "verify-full", "sslrootcert", f.CA,
			"sslcert", f.ClientCert, "sslkey", f.ClientKey, "sslcertmode", "require"), pgtest.Schema(t))
		tlsRequireSession(t, c, true, "/CN="+certs.ClientName)
	})
	t.Run("client certificate of an unknown authority", func(t *testing.T) {
		t.Parallel()
		// The server verifies the certificates that clients present
		// against ssl_ca_file, and ends the handshake ("certificate verify
		// failed" in its log); the client sees the connection reset, or
		// the TLS alert when it reads one first.
		_, err := pgstore.Connect(testCtx(t), srv.connString("localhost", "sslmode", "verify-full", "sslrootcert", f.CA,
			"sslcert", otherCert, "sslkey", otherKey))
		require.ErrorContains(t, err, "failed to connect")
	})
	t.Run("TLS files with sslmode=disable are refused", func(t *testing.T) {
		t.Parallel()
		for _, key := range []string{"sslrootcert", "sslcert", "sslkey"} {
			for _, connString := range []string{
				srv.connString("127.0.0.1", "sslmode", "disable", key, f.CA),
				srv.url("127.0.0.1", "sslmode", "disable", key, f.CA),
			} {
				_, err := pgstore.Connect(testCtx(t), connString)
				require.ErrorContains(t, err, fmt.Sprintf("sslmode is disable, yet %s is set (%q)", key, f.CA))
				_, err = pgstore.Check(testCtx(t), connString)
				require.ErrorContains(t, err, "sslmode is disable, yet "+key)
			}
		}
	})
	for _, half := range []struct{ name, given, file, missing string }{
		{"client certificate without its key", "sslcert", f.ClientCert, "sslkey"},
		{"client key without its certificate", "sslkey", f.ClientKey, "sslcert"},
	} {
		t.Run(half.name, func(t *testing.T) {
			t.Parallel()
			connString := srv.connString("localhost", "sslmode", "verify-full", "sslrootcert", f.CA, half.given, half.file)
			_, err := pgstore.Connect(testCtx(t), connString)
			require.ErrorContains(t, err, `both "sslcert" and "sslkey" are required`)
			_, err = pgstore.Check(testCtx(t), connString)
			require.ErrorContains(t, err, fmt.Sprintf("%s is set (%q) but %s is not", half.given, half.file, half.missing))

			urlString := srv.url("localhost", "sslmode", "verify-full", "sslrootcert", f.CA, half.given, half.file)
			_, err = pgstore.Check(testCtx(t), urlString)
			require.ErrorContains(t, err, "but "+half.missing+" is not")
		})
	}
}

// The environment by which the subtest of TestTLS on the system trust store
// tells its helper what to connect to.
const (
	systemTrustURL    = "PGSTORE_TEST_SYSTEM_TRUST_URL"
	systemTrustSchema = "PGSTORE_TEST_SYSTEM_TRUST_SCHEMA"
)

// TestTLSSystemTrustStoreHelper is run by TestTLS, in a process of its own
// whose system trust store is the test's authority; run otherwise, it skips.
func TestTLSSystemTrustStoreHelper(t *testing.T) {
	connString := os.Getenv(systemTrustURL)
	if connString == "" {
		t.Skip("run by TestTLS")
	}
	c := connectURL(t, connString, os.Getenv(systemTrustSchema))
	tlsRequireSession(t, c, true, "")
}

// tlsRequireSession writes and reads a record and asserts how the
// connector's session is secured, as pg_stat_ssl reports it.
func tlsRequireSession(t *testing.T, c *pgstore.Connector, ssl bool, clientDN string) {
	t.Helper()
	ctx := testCtx(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]string{"tls": "yes"}))
	rec, err := c.Get(ctx, "cars/bmw")
	require.NoError(t, err)
	require.JSONEq(t, `{"tls": "yes"}`, string(rec.Value))

	rows, err := c.Query(ctx, "SELECT ssl, coalesce(client_dn, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
	require.NoError(t, err)
	type session struct {
		SSL      bool
		ClientDN string
	}
	got, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByPos[session])
	require.NoError(t, err)
	require.Equal(t, session{ssl, clientDN}, got)

	report, err := c.Check(ctx)
	require.NoError(t, err)
	want := "connections are not encrypted"
	if ssl {
		want = "connections use TLS 1."
	}
	require.Contains(t, chkFind(t, report, "TLS").Detail, want, "Check says how the connections are secured")
}

// tlsServer is the test server with SSL on.
type tlsServer struct {
	cfg   *pgx.ConnConfig // of pgtest.URL
	files certs.Files
}

// connString returns a keyword/value connection string for the test server
// at host, with more settings in pairs.
func (s tlsServer) connString(host string, settings ...string) string {
	kv := []string{"host", host, "port", strconv.Itoa(int(s.cfg.Port)), "user", s.cfg.User, "dbname", s.cfg.Database}
	if s.cfg.Password != "" {
		kv = append(kv, "password", s.cfg.Password)
	}
	var b strings.Builder
	for i, v := range append(kv, settings...) {
		if i%2 == 0 {
			fmt.Fprintf(&b, "%s=", v)
		} else {
			fmt.Fprintf(&b, "'%s' ", strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v))
		}
	}
	return b.String()
}

// url is connString as a URL.
func (s tlsServer) url(host string, settings ...string) string {
	q := url.Values{}
	for i := 0; i+1 < len(settings); i += 2 {
		q.Set(settings[i], settings[i+1])
	}
	u := url.URL{
		Scheme: "postgres", User: url.UserPassword(s.cfg.User, s.cfg.Password),
		Host: net.JoinHostPort(host, strconv.Itoa(int(s.cfg.Port))), Path: "/" + s.cfg.Database, RawQuery: q.Encode(),
	}
	if s.cfg.Password == "" {
		u.User = url.User(s.cfg.User)
	}
	return u.String()
}

// tlsSettings are the server settings the test changes and restores.
var tlsSettings = []string{"ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file"}

// tlsSetup turns SSL on at the test server with certificates of the test's
// own, or skips the test saying why it cannot, and restores the settings
// when the test ends. A lock keeps test processes that run at once from
// changing the settings under one another.
func tlsSetup(t *testing.T) tlsServer {
	t.Helper()
	ctx := testCtx(t)
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	admin, err := pgx.Connect(ctx, pgtest.URL(t))
	require.NoError(t, err)
	t.Cleanup(func() { admin.Close(context.Background()) }) // runs last

	var serverAddr *string
	var superuser bool
	var dataDir string
	require.NoError(t, admin.QueryRow(ctx, `SELECT inet_server_addr()::text, current_setting('is_superuser') = 'on', current_setting('data_directory')`).
		Scan(&serverAddr, &superuser, &dataDir))
	if serverAddr != nil {
		ip, _, _ := strings.Cut(*serverAddr, "/")
		if addr := net.ParseIP(ip); addr == nil || !addr.IsLoopback() {
			t.Skipf("the test server is not local (it is at %s): the test cannot give it certificate files", *serverAddr)
		}
	}
	if strings.HasPrefix(cfg.Host, "/") {
		t.Skipf("the test server is reached through the socket in %s; the test needs TCP", cfg.Host)
	}
	if !superuser {
		t.Skipf("role %q is not a superuser: the test cannot turn SSL on", cfg.User)
	}
	info, err := os.Stat(dataDir)
	if err != nil {
		t.Skipf("the server's data directory is not on this machine: %v", err)
	}
	owner := info.Sys().(*syscall.Stat_t)
	uid, gid := int(owner.Uid), int(owner.Gid)
	chownTo := -1 // running as the server's user already
	switch euid := os.Geteuid(); euid {
	case uid:
	case 0:
		chownTo = uid
	default:
		t.Skipf("running as uid %d, neither root nor the server's user (uid %d): the test cannot give the server a key file it accepts", euid, uid)
	}
	dir := filepath.Join(filepath.Dir(dataDir), "pgstore-test-tls")
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil && u.HomeDir != "" {
		if _, err := os.Stat(u.HomeDir); err == nil {
			dir = filepath.Join(u.HomeDir, "pgstore-test-tls")
		}
	}

	_, err = admin.Exec(ctx, "SELECT pg_advisory_lock(hashtextextended('pgstore tls test', 0))") // released by Close
	require.NoError(t, err)
	files, err := certs.Ensure(dir, chownTo, gid, "localhost")
	require.NoError(t, err, "certificates in %s", dir)
	srv := tlsServer{cfg: cfg, files: files}

	// Remember what ALTER SYSTEM had set, except values left by an earlier
	// run that ended before restoring them.
	restore := make(map[string]*string)
	for _, name := range tlsSettings {
		var setting, source string
		require.NoError(t, admin.QueryRow(ctx, "SELECT setting, coalesce(sourcefile, '') FROM pg_settings WHERE name = $1", name).Scan(&setting, &source))
		if filepath.Base(source) == "postgresql.auto.conf" && !strings.HasPrefix(setting, dir+"/") {
			restore[name] = &setting
		}
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// A connection of its own, in case another test ended the admin's.
		admin, err := pgx.Connect(ctx, pgtest.URL(t))
		require.NoError(t, err)
		defer admin.Close(ctx)
		for _, name := range tlsSettings {
			stmt := "ALTER SYSTEM RESET " + name
			if v := restore[name]; v != nil {
				stmt = fmt.Sprintf("ALTER SYSTEM SET %s = '%s'", name, strings.ReplaceAll(*v, "'", "''"))
			}
			_, err := admin.Exec(ctx, stmt)
			require.NoError(t, err, stmt)
		}
		tlsReload(t, ctx, admin)
		// The server still takes plain connections, and TLS ones if SSL
		// is on (again).
		conn, err := pgx.Connect(ctx, srv.connString("127.0.0.1", "sslmode", "disable"))
		require.NoError(t, err, "plain connection after the SSL settings were restored")
		var ssl string
		require.NoError(t, conn.QueryRow(ctx, "SELECT current_setting('ssl')").Scan(&ssl))
		conn.Close(ctx)
		if ssl == "on" {
			conn, err := pgx.Connect(ctx, srv.connString("127.0.0.1", "sslmode", "require"))
			require.NoError(t, err, "TLS connection after the SSL settings were restored")
			conn.Close(ctx)
		}
	})

	for name, value := range map[string]string{
		"ssl": "on", "ssl_cert_file": files.ServerCert, "ssl_key_file": files.ServerKey, "ssl_ca_file": files.CA,
	} {
		_, err := admin.Exec(ctx, fmt.Sprintf("ALTER SYSTEM SET %s = '%s'", name, strings.ReplaceAll(value, "'", "''")))
		require.NoError(t, err)
	}
	tlsReload(t, ctx, admin)
	tlsPoll(t, ctx, "the server to present the test's certificate (see the server's log)", func() error {
		conn, err := pgx.Connect(ctx, srv.connString("localhost", "sslmode", "verify-full", "sslrootcert", files.CA))
		if err != nil {
			return err
		}
		return conn.Close(ctx)
	})
	return srv
}

// tlsReload makes the server reload its configuration and waits until new
// sessions see it loaded.
func tlsReload(t *testing.T, ctx context.Context, admin *pgx.Conn) {
	t.Helper()
	var before time.Time
	require.NoError(t, admin.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&before))
	_, err := admin.Exec(ctx, "SELECT pg_reload_conf()")
	require.NoError(t, err)
	tlsPoll(t, ctx, "the server to reload its configuration", func() error {
		conn, err := pgx.Connect(ctx, pgtest.URL(t))
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		var loaded time.Time
		if err := conn.QueryRow(ctx, "SELECT pg_conf_load_time()").Scan(&loaded); err != nil {
			return err
		}
		if !loaded.After(before) {
			return fmt.Errorf("configuration last loaded at %v", loaded)
		}
		return nil
	})
}

// tlsPoll calls try every 50ms until it succeeds, for up to 10s.
func tlsPoll(t *testing.T, ctx context.Context, what string, try func() error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := try()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waited 10s for %s: %v", what, err)
		case <-tick.C:
		}
	}
}
