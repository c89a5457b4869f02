package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgstore/pgstore"
)

// parse runs parseSettings on a FlagSet of its own with env as the whole
// environment.
func parse(args []string, env map[string]string) (*settings, error) {
	fs := flag.NewFlagSet("realtime", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return parseSettings(fs, args, func(name string) (string, bool) {
		v, ok := env[name]
		return v, ok
	})
}

// A password that only correct quoting gets through a keyword/value string.
const oddPassword = ` it's a "secret" with \ and \\, ' and = `

func TestParseSettings(t *testing.T) {
	t.Parallel()
	// Only what a case sets is checked: pgx fills in the rest from the PG*
	// variables of the process, which the tests leave alone.
	type want struct {
		host, user, password, database string
		port                           uint16
		maxConns                       int32
		appName                        string
		schema                         string
		limits                         Limits
	}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want want
	}{
		{
			name: "defaults",
			want: want{host: "127.0.0.1", port: 5432, user: "postgres", database: "test", appName: pgstore.DefaultApplicationName, schema: "realtime",
				limits: Limits{MaxValueBytes: 64 << 10, MaxSubscriptions: 10000}},
		},
		{
			name: "URL only",
			args: []string{"-url", "postgres://alice:pw@db.example:6543/app?sslmode=disable&pool_max_conns=7"},
			want: want{host: "db.example", port: 6543, user: "alice", password: "pw", database: "app", maxConns: 7, appName: pgstore.DefaultApplicationName},
		},
		{
			name: "URL from DATABASE_URL, its application_name kept",
			env:  map[string]string{"DATABASE_URL": "postgres://bob@db.example/app?sslmode=disable&application_name=mine"},
			want: want{host: "db.example", port: 5432, user: "bob", database: "app", appName: "mine"},
		},
		{
			name: "URL with pool size and limits",
			args: []string{"-url", "postgres://u@h/d?sslmode=disable&pool_max_conns=7", "-db-pool-size", "3", "-max-subscriptions", "5"},
			env:  map[string]string{"REALTIME_MAX_VALUE_BYTES": "1000", "REALTIME_MAX_MESSAGES_PER_SECOND": "20"},
			want: want{host: "h", maxConns: 3, limits: Limits{MaxValueBytes: 1000, MaxSubscriptions: 5, MessagesPerSecond: 20}},
		},
		{
			name: "discrete flags",
			args: []string{"-db-host", "db.example", "-db-port", "6000", "-db-user", "carol", "-db-password", "pw", "-db-name", "app",
				"-db-sslmode", "disable", "-db-pool-size", "9", "-schema", "mine"},
			want: want{host: "db.example", port: 6000, user: "carol", password: "pw", database: "app", maxConns: 9, schema: "mine"},
		},
		{
			name: "discrete environment",
			env: map[string]string{"REALTIME_DB_HOST": "db.example", "REALTIME_DB_PORT": "6000", "REALTIME_DB_USER": "carol",
				"REALTIME_DB_PASSWORD": "pw", "REALTIME_DB_NAME": "app", "REALTIME_DB_SSLMODE": "disable", "REALTIME_DB_POOL_SIZE": "9",
				"REALTIME_SCHEMA": "mine"},
			want: want{host: "db.example", port: 6000, user: "carol", password: "pw", database: "app", maxConns: 9, schema: "mine"},
		},
		{
			name: "flags win over the environment, which fills in the rest",
			args: []string{"-db-host", "flag.example", "-max-subscriptions", "7"},
			env:  map[string]string{"REALTIME_DB_HOST": "env.example", "REALTIME_DB_USER": "dave", "REALTIME_MAX_SUBSCRIPTIONS": "5"},
			want: want{host: "flag.example", user: "dave", limits: Limits{MaxValueBytes: 64 << 10, MaxSubscriptions: 7}},
		},
		{
			name: "an empty variable is unset",
			env:  map[string]string{"REALTIME_DB_HOST": "", "DATABASE_URL": ""},
			want: want{host: "127.0.0.1", user: "postgres"},
		},
		{
			name: "password flag round-trips",
			args: []string{"-db-password", oddPassword, "-db-user", "a user", "-db-name", `d'b`},
			want: want{password: oddPassword, user: "a user", database: `d'b`},
		},
		{
			name: "password variable round-trips",
			env:  map[string]string{"REALTIME_DB_PASSWORD": oddPassword},
			want: want{password: oddPassword},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := parse(tc.args, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			cc := s.pool.ConnConfig
			check := func(what string, got, want any, set bool) {
				t.Helper()
				if set && got != want {
					t.Errorf("%s = %#v, want %#v", what, got, want)
				}
			}
			w := tc.want
			check("host", cc.Host, w.host, w.host != "")
			check("port", cc.Port, w.port, w.port != 0)
			check("user", cc.User, w.user, w.user != "")
			check("password", cc.Password, w.password, w.password != "")
			check("database", cc.Database, w.database, w.database != "")
			check("MaxConns", s.pool.MaxConns, w.maxConns, w.maxConns != 0)
			check("application_name", cc.RuntimeParams["application_name"], w.appName, w.appName != "")
			check("schema", s.schema, w.schema, w.schema != "")
			check("limits", s.limits, w.limits, w.limits != Limits{})
		})
	}
}

func TestParseSettingsErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string // in the error
	}{
		{"URL and user flags", []string{"-url", "postgres://h/d", "-db-user", "u"}, nil,
			"-db-user cannot be used with -url"},
		{"URL and variables", nil, map[string]string{"DATABASE_URL": "postgres://h/d", "REALTIME_DB_PASSWORD": "pw", "REALTIME_DB_SSLMODE": "require"},
			"REALTIME_DB_PASSWORD, REALTIME_DB_SSLMODE cannot be used with DATABASE_URL"},
		{"URL variable and host flag", []string{"-db-host", "h"}, map[string]string{"DATABASE_URL": "postgres://h/d"},
			"-db-host cannot be used with DATABASE_URL"},
		{"URL and a certificate without key", []string{"-url", "postgres://h/d", "-db-sslcert", "client.crt"}, nil,
			"-db-sslcert cannot be used with -url"},
		{"certificate without key", []string{"-db-sslcert", "client.crt"}, nil,
			"-db-sslcert is set but -db-sslkey (or REALTIME_DB_SSLKEY) is not"},
		{"key without certificate", nil, map[string]string{"REALTIME_DB_SSLKEY": "client.key"},
			"REALTIME_DB_SSLKEY is set but -db-sslcert (or REALTIME_DB_SSLCERT) is not"},
		{"certificate without key in a URL", []string{"-url", "postgres://h/d?sslmode=require&sslcert=client.crt"}, nil,
			`-url: cannot parse the connection string: failed to configure TLS (both "sslcert" and "sslkey" are required)`},
		{"port not a number", nil, map[string]string{"REALTIME_DB_PORT": "x"},
			`invalid value "x" for REALTIME_DB_PORT`},
		{"port out of range", []string{"-db-port", "70000"}, nil,
			"-db-port: 70000 is not a port number"},
		{"unknown TLS mode", nil, map[string]string{"REALTIME_DB_SSLMODE": "on"},
			`REALTIME_DB_SSLMODE: unknown TLS mode "on"`},
		{"negative pool size", []string{"-db-pool-size", "-1"}, nil,
			"-db-pool-size: -1 connections"},
		{"value limit over pgstore's", []string{"-max-value-bytes", "5000000"}, nil,
			"-max-value-bytes: 5000000 bytes is not between 1 and 4194304"},
		{"no subscriptions", nil, map[string]string{"REALTIME_MAX_SUBSCRIPTIONS": "0"},
			"REALTIME_MAX_SUBSCRIPTIONS: 0"},
		{"negative rate", []string{"-max-messages-per-second", "-5"}, nil,
			"-max-messages-per-second: -5 is negative"},
		{"negative retention", []string{"-retention", "-1h"}, nil,
			"-retention: -1h0m0s is negative"},
		{"unknown flag", []string{"-db-hots", "h"}, nil,
			"flag provided but not defined: -db-hots"},
		{"argument", []string{"postgres://h/d"}, nil,
			`unexpected argument "postgres://h/d"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse(tc.args, tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got error %v, want one holding %q", err, tc.want)
			}
		})
	}
}

// TestParseSettingsHidesPasswords checks that errors from pgx leave out the
// connection string, where pgx's masking misses some passwords.
func TestParseSettingsHidesPasswords(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"-db-password", oddPassword, "-db-sslmode", "verify-full", "-db-sslrootcert", filepath.Join(t.TempDir(), "missing.crt")},
		{"-url", `host=h password='it\'s secret' sslmode=nope`},
	} {
		_, err := parse(args, nil)
		if err == nil {
			t.Fatalf("%q: no error", args)
		}
		if strings.Contains(err.Error(), "secret") {
			t.Errorf("%q: error shows the password: %v", args, err)
		}
	}
}

// TestParseSettingsTLS checks that the TLS files reach pgx's configuration.
func TestParseSettingsTLS(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "my cert.pem"), filepath.Join(dir, "key's.pem")
	writeSelfSigned(t, certFile, keyFile)
	s, err := parse([]string{"-db-host", "db.example", "-db-sslmode", "verify-full"}, map[string]string{
		"REALTIME_DB_SSLROOTCERT": certFile, "REALTIME_DB_SSLCERT": certFile, "REALTIME_DB_SSLKEY": keyFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	tc := s.pool.ConnConfig.TLSConfig
	if tc == nil || tc.ServerName != "db.example" || tc.RootCAs == nil || len(tc.Certificates) != 1 {
		t.Fatalf("TLS configuration %+v, want verify-full of db.example with a root CA and a client certificate", tc)
	}
	if len(s.pool.ConnConfig.Fallbacks) != 0 {
		t.Errorf("verify-full has %d fallbacks, want none (no plain-text retry)", len(s.pool.ConnConfig.Fallbacks))
	}
}

// writeSelfSigned writes a self-signed certificate and its key, PEM-encoded.
func writeSelfSigned(t *testing.T, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "db.example"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestSettingsDocumented checks that every flag has an environment variable
// and that README.md's table names both.
func TestSettingsDocumented(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	env := make(map[string]string)
	for _, v := range envVars {
		env[v.Flag] = v.Env
	}
	fs := flag.NewFlagSet("realtime", flag.ContinueOnError)
	if _, err := parseSettings(fs, nil, func(string) (string, bool) { return "", false }); err != nil {
		t.Fatal(err)
	}
	fs.VisitAll(func(f *flag.Flag) {
		if env[f.Name] == "" {
			t.Errorf("flag -%s has no environment variable", f.Name)
		}
		if row := "| `-" + f.Name + "` | `" + env[f.Name] + "` |"; !strings.Contains(string(readme), row) {
			t.Errorf("README.md has no row starting %s", row)
		}
	})
}

func TestRate(t *testing.T) {
	t.Parallel()
	t0 := time.Now()
	r := newRate(2, t0)
	for i, tc := range []struct {
		after time.Duration
		want  bool
	}{
		{0, true}, {0, true}, {0, false}, // a burst of a second's worth
		{499 * time.Millisecond, false},
		{500 * time.Millisecond, true}, // half a second: one more
		{500 * time.Millisecond, false},
		{time.Hour, true}, {time.Hour, true}, {time.Hour, false}, // idling saves no more than a burst
	} {
		if got := r.allow(t0.Add(tc.after)); got != tc.want {
			t.Fatalf("message %d, %v after the start: allowed %v, want %v", i, tc.after, got, tc.want)
		}
	}
	unlimited := newRate(0, t0)
	for range 1000 {
		if !unlimited.allow(t0) {
			t.Fatal("a rate of 0 refused a message")
		}
	}
}
