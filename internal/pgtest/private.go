package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// privateSettings make a private server quick to start and cheap to run: it
// holds nothing worth keeping, so nothing needs to reach the disk. Only TCP
// on the loopback, so that servers of parallel tests share no socket path.
var privateSettings = []string{
	"listen_addresses=127.0.0.1",
	"unix_socket_directories=",
	"fsync=off",
	"synchronous_commit=off",
	"full_page_writes=off",
	"shared_buffers=16MB",
	"max_wal_senders=0", // counts with max_connections towards the lock table's size
}

// Private starts a PostgreSQL server of the test's own and returns its
// connection string (database postgres, user postgres, trust
// authentication). It is for tests that would hurt other sessions of the
// shared server: filling its notification queue, exhausting its lock table.
// Each setting, "name=value", is a server setting, such as
// "max_locks_per_transaction=64". The server is stopped and its files removed
// when the test ends.
//
// The server runs initdb and pg_ctl of the installation of the shared
// server's major version if there is one (pg_config --bindir,
// /usr/lib/postgresql/*/bin), else of another found there. Without them the
// test is skipped, except when CI=true, where that is a failure. Run as root,
// the server runs as the operating system's user postgres, as initdb demands.
func Private(t testing.TB, settings ...string) string {
	t.Helper()
	for _, s := range settings {
		if name, _, ok := strings.Cut(s, "="); !ok || strings.TrimSpace(name) == "" {
			t.Fatalf("private server: setting %q is not name=value", s)
		}
	}
	bin, err := privateBinaries()
	if err != nil {
		skipOrFail(t, fmt.Errorf("no private PostgreSQL server: %w", err))
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		if cred, err = postgresUser(); err != nil {
			skipOrFail(t, fmt.Errorf("no private PostgreSQL server: run as root, and %w", err))
		}
	}
	dir := t.TempDir()
	if cred != nil {
		// The server's user must reach its directory: the test's temporary
		// directory is the root's, readable by no one else.
		if err := os.Chmod(filepath.Dir(dir), 0o711); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	s := &privateServer{bin: bin, dir: dir, data: filepath.Join(dir, "data"), cred: cred}
	if out, err := s.run("initdb", "-D", s.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		t.Fatalf("private server: initdb: %v\n%s", err, out)
	}
	if err := s.configure(append(slices.Clone(privateSettings), settings...)); err != nil {
		t.Fatalf("private server: %v", err)
	}
	port, err := s.start()
	if err != nil {
		t.Fatalf("private server: %v", err)
	}
	t.Cleanup(func() {
		if out, err := s.run("pg_ctl", "stop", "-D", s.data, "-m", "immediate", "-w"); err != nil {
			t.Errorf("private server: pg_ctl stop: %v\n%s", err, out)
		}
	})
	u := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	if err := ping(u); err != nil {
		t.Fatalf("private server: started, but does not answer: %v\n%s", err, s.logTail())
	}
	return u
}

// skipOrFail skips the test for want of something the environment may
// lack, or fails it under CI=true, where nothing may be missing.
func skipOrFail(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatal(err)
	}
	t.Skip(err)
}

type privateServer struct {
	bin, dir, data string
	cred           *syscall.Credential // whom to run as; nil for the test's own user
}

// run runs one of the server's programs, as the server's user, and returns
// what it printed.
func (s *privateServer) run(program string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(s.bin, program), args...)
	cmd.Dir = s.dir // the server's user may not reach the test's directory
	// The test's PG* variables point at the shared server; messages in
	// English, so that start can recognise a port taken.
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_") || strings.HasPrefix(kv, "LANG")
	})
	cmd.Env = append(cmd.Env, "LC_ALL=C")
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// configure appends settings to postgresql.conf, where the last of a name
// wins. Written there, values need no quoting for a shell.
func (s *privateServer) configure(settings []string) error {
	var b strings.Builder
	b.WriteString("\n# pgtest.Private\n")
	for _, setting := range settings {
		name, value, _ := strings.Cut(setting, "=")
		fmt.Fprintf(&b, "%s = '%s'\n", strings.TrimSpace(name), strings.ReplaceAll(strings.TrimSpace(value), "'", "''"))
	}
	f, err := os.OpenFile(filepath.Join(s.data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(b.String()); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// start starts the server on a free port and waits until it accepts
// connections. Another process may take the port between the look and the
// server's bind: then it tries another.
func (s *privateServer) start() (int, error) {
	for attempt := 1; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return 0, err
		}
		out, err := s.run("pg_ctl", "start", "-D", s.data, "-l", s.logFile(), "-w", "-t", "60", "-o", "-p "+strconv.Itoa(port))
		if err == nil {
			return port, nil
		}
		log := s.logTail()
		if attempt < 5 && strings.Contains(log, "could not bind") {
			continue
		}
		return 0, fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
}

func (s *privateServer) logFile() string { return filepath.Join(s.dir, "server.log") }

// logTail returns the end of the server's log, for an error message.
func (s *privateServer) logTail() string {
	b, err := os.ReadFile(s.logFile())
	if err != nil {
		return "(no server log: " + err.Error() + ")"
	}
	const keep = 4000
	if len(b) > keep {
		b = b[len(b)-keep:]
	}
	return string(b)
}

// freePort returns a TCP port of the loopback that no one listens on now.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// postgresUser returns the credentials of the operating system's user
// postgres.
func postgresUser() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("there is no user postgres to run initdb as: %w", err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, err
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, err
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// privateBinaries returns the directory of the initdb and pg_ctl to run, found
// once.
func privateBinaries() (string, error) {
	binOnce.Do(func() { binDir, binErr = findBinaries() })
	return binDir, binErr
}

// findBinaries looks for the directories that hold initdb and pg_ctl, and
// returns the one of the shared server's major version, or else the newest.
func findBinaries() (string, error) {
	var dirs []string
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dirs = append(dirs, strings.TrimSpace(string(out)))
	}
	for _, pattern := range []string{"/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"} {
		found, _ := filepath.Glob(pattern)
		dirs = append(dirs, found...)
	}
	type install struct {
		dir   string
		major int
	}
	var installs []install
	for _, dir := range dirs {
		if !executable(filepath.Join(dir, "initdb")) || !executable(filepath.Join(dir, "pg_ctl")) {
			continue
		}
		if major, err := binaryMajor(dir); err == nil {
			installs = append(installs, install{dir, major})
		}
	}
	if len(installs) == 0 {
		return "", errors.New("found no initdb and pg_ctl (looked at pg_config --bindir, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin); install PostgreSQL's server package")
	}
	if major, err := sharedMajor(); err == nil {
		for _, in := range installs {
			if in.major == major {
				return in.dir, nil
			}
		}
	}
	slices.SortStableFunc(installs, func(a, b install) int { return b.major - a.major })
	return installs[0].dir, nil
}

func executable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

var versionRE = regexp.MustCompile(`\(PostgreSQL\) (\d+)`)

// binaryMajor returns the major version of the PostgreSQL in dir.
func binaryMajor(dir string) (int, error) {
	out, err := exec.Command(filepath.Join(dir, "pg_ctl"), "--version").Output()
	if err != nil {
		return 0, err
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("pg_ctl --version: %q", out)
	}
	return strconv.Atoi(string(m[1]))
}

// sharedMajor returns the major version of the shared test server.
func sharedMajor() (int, error) {
	u, err := Find()
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	var num int
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&num); err != nil {
		return 0, err
	}
	return num / 10000, nil
}
