package pgtest

import (
	"net"
	"net/url"
	"sync"
	"testing"
)

// A Proxy forwards TCP connections to the test server, and can cut them all
// and refuse new ones, as a restarting server or a broken network would.
type Proxy struct {
	target string
	ln     net.Listener
	mu     sync.Mutex
	down   bool
	thaw   chan struct{} // while frozen: closed by Restore
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// NewProxy starts a proxy to the test server on a loopback port and returns
// it with a connection string that goes through it. It stops when the test
// ends.
func NewProxy(t testing.TB) (*Proxy, string) {
	t.Helper()
	u, err := url.Parse(URL(t))
	if err != nil {
		t.Fatalf("proxy: test URL is not a URL: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{target: u.Host, ln: ln, conns: make(map[net.Conn]struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	u.Host = ln.Addr().String()
	return p, u.String()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		server, err := net.Dial("tcp", p.target) // not under the lock: Cut must not wait for it
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		if p.down {
			p.mu.Unlock()
			client.Close()
			server.Close()
			continue
		}
		p.conns[client] = struct{}{}
		p.conns[server] = struct{}{}
		p.wg.Add(2)
		go p.pipe(client, server)
		go p.pipe(server, client)
		p.mu.Unlock()
	}
}

func (p *Proxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			thaw := p.thaw
			p.mu.Unlock()
			if thaw != nil {
				<-thaw // frozen: hold the bytes, as a lost network would
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break // closed or cut
		}
	}
	dst.Close()
	src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}

// Cut closes every connection through the proxy and refuses new ones until
// Restore.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
}

// Restore accepts connections again, and ends a Freeze.
func (p *Proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
	if p.thaw != nil {
		close(p.thaw)
		p.thaw = nil
	}
}

// Freeze stops forwarding bytes without closing anything, until Restore:
// the connections hang, as over a network that silently lost the server.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.thaw == nil {
		p.thaw = make(chan struct{})
	}
}

func (p *Proxy) close() {
	p.ln.Close()
	p.Restore()
	p.Cut()
	p.wg.Wait()
}
