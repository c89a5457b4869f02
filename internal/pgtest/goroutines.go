package pgtest

import (
	"bytes"
	"runtime"
	"time"
)

// WaitForAsyncCloses waits, at most 20 s, until no connection of pgx is still
// closing on a goroutine of its own. pgconn closes a connection whose query
// was cancelled that way (asyncClose): it sends the server a cancel request
// first, on a new connection, and gives that 15 s. A leak check run before
// those end races them; one run after finds only real leaks.
func WaitForAsyncCloses() {
	deadline := time.Now().Add(20 * time.Second)
	buf := make([]byte, 1<<20)
	for time.Now().Before(deadline) {
		n := runtime.Stack(buf, true)
		if !bytes.Contains(buf[:n], []byte("pgconn.(*PgConn).asyncClose")) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
