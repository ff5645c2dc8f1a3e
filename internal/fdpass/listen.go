package fdpass

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Policy says who may connect to a Listener and how its socket file is made.
type Policy struct {
	// UIDs lists the user IDs allowed to connect. Nil means the listener's
	// own effective UID. Root (UID 0) is always allowed: it could take the
	// sockets from either process anyway.
	UIDs []uint32
	// GIDs lists group IDs allowed to connect too, matched against the
	// peer's effective GID at connect time (supplementary groups are not
	// known to SO_PEERCRED).
	GIDs []uint32
	// Mode is the permission bits of the socket file; zero means 0600.
	// Connecting needs write permission on the file, so the mode is a first
	// gate and the credential check a second one.
	Mode fs.FileMode
	// Group, if not empty, is the group (a name or a numeric GID) given to
	// the socket file, for a Mode such as 0660.
	Group string
	// Limits bound what the listener's connections accept.
	Limits Limits
}

// Listener accepts handoff connections on a unix socket file. Its methods
// may be called from several goroutines.
type Listener struct {
	ln   *net.UnixListener
	path string
	uids []uint32
	gids []uint32
	lim  Limits
}

// Listen creates the unix socket path and listens on it.
//
// The directory must exist, belong to the caller's effective UID or root,
// and must not be writable by group or others unless it is sticky: whoever
// can write it can replace the socket. The socket file is created with
// Policy.Mode and no wider, even for a moment: the socket's own mode is set
// (fchmod) before bind, which Linux uses for the file it creates, and the
// final mode and group are set once the file exists. The file appears at
// path only then, listening (it is made under a temporary name in the same
// directory and renamed): a client that sees it can connect at once. A
// socket file left by
// a process that no longer listens is replaced; a live one is an error
// (EADDRINUSE), and so is any other file at path. Abstract socket names
// (starting with '@') have no permissions and are refused.
func Listen(path string, p Policy) (*Listener, error) {
	op := "listen " + path
	l, err := listen(path, p)
	if err != nil {
		return nil, &OpError{Op: op, Err: err}
	}
	return l, nil
}

func listen(path string, p Policy) (*Listener, error) {
	if path == "" || path[0] == '@' || path[0] == 0 {
		return nil, fmt.Errorf("%w: abstract or empty socket name: give a file path", ErrInvalid)
	}
	mode := p.Mode
	if mode == 0 {
		mode = 0o600
	}
	if mode&^fs.ModePerm != 0 {
		return nil, fmt.Errorf("%w: mode %v has bits other than permissions", ErrInvalid, mode)
	}
	gid := -1
	if p.Group != "" {
		var err error
		if gid, err = lookupGroup(p.Group); err != nil {
			return nil, err
		}
	}
	if err := checkDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.Fchmod(int(fd), uint32(mode&0o700)) }); err != nil {
			return err
		}
		return os.NewSyscallError("fchmod", serr)
	}}
	// Bound under a temporary name, then renamed: a file at path that
	// refused connections (bound, not yet listening) would be a race for
	// every client that waits for it to appear. A temporary name too long
	// for a socket address falls back to binding path itself.
	bindAt := filepath.Join(filepath.Dir(path), fmt.Sprintf(".fdpass-%d-%d", os.Getpid(), tmpSeq.Add(1)))
	if len(bindAt) >= len(unix.RawSockaddrUnix{}.Path) {
		bindAt = path
	}
	if bindAt != path {
		os.Remove(bindAt) // a leftover of a crashed process with this pid
	}
	ln, err := lc.Listen(context.Background(), "unix", bindAt)
	if err != nil {
		return nil, err
	}
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false) // Close removes path, whatever it was bound as
	if gid >= 0 {
		err = os.Lchown(bindAt, -1, gid)
	}
	if err == nil {
		err = os.Chmod(bindAt, mode)
	}
	if err == nil && bindAt != path {
		// Not over a file that appeared since removeStale: bind at path
		// would have failed with EADDRINUSE, and so does this.
		if err = unix.Renameat2(unix.AT_FDCWD, bindAt, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); errors.Is(err, unix.EEXIST) {
			err = unix.EADDRINUSE
		}
		if err != nil {
			err = &os.LinkError{Op: "rename", Old: bindAt, New: path, Err: err}
		}
	}
	if err != nil {
		ul.Close()
		os.Remove(bindAt)
		return nil, err
	}
	uids := p.UIDs
	if uids == nil {
		uids = []uint32{uint32(os.Geteuid())}
	}
	return &Listener{ln: ul, path: path, uids: slices.Clone(uids), gids: slices.Clone(p.GIDs), lim: p.Limits.resolve()}, nil
}

func lookupGroup(name string) (int, error) {
	if n, err := strconv.ParseUint(name, 10, 32); err == nil {
		return int(n), nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("%w: group %q: %v", ErrInvalid, name, err)
	}
	n, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("%w: group %q has GID %q", ErrInvalid, name, g.Gid)
	}
	return n, nil
}

// checkDir refuses a directory in which another user could replace the
// socket file.
func checkDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%w: %s is not a directory", ErrInvalid, dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%w: directory %s belongs to uid %d: its owner could replace the socket", ErrInvalid, dir, st.Uid)
	}
	if fi.Mode().Perm()&0o022 != 0 && fi.Mode()&fs.ModeSticky == 0 {
		return fmt.Errorf("%w: directory %s (mode %v) is writable by group or others: they could replace the socket", ErrInvalid, dir, fi.Mode().Perm())
	}
	return nil
}

// removeStale removes a socket file nobody listens on any more.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%w: %s exists and is not a socket", ErrInvalid, path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("another process listens on it: %w", unix.EADDRINUSE)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return err
	}
	return os.Remove(path)
}

// Path returns the path of the socket file.
func (l *Listener) Path() string { return l.path }

// Close stops listening and removes the socket file. Connections already
// accepted stay open.
func (l *Listener) Close() error {
	if err := l.ln.Close(); err != nil {
		return &OpError{Op: "close " + l.path, Err: err}
	}
	if err := os.Remove(l.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return &OpError{Op: "close " + l.path, Err: err}
	}
	return nil
}

// tmpSeq numbers the temporary names Listen binds under.
var tmpSeq atomic.Uint64

// Accept waits for a connection, checks the peer's credentials against the
// policy and sends the hello. A refused peer is sent an error frame saying
// why and is disconnected, and Accept returns an error matching ErrRefused
// (a *PeerError inside an *OpError): the listener stays usable, so an accept
// loop logs it and goes on.
func (l *Listener) Accept() (*Conn, error) {
	uc, err := l.ln.AcceptUnix()
	if err != nil {
		return nil, &OpError{Op: "accept on " + l.path, Err: err}
	}
	cred, err := peerCred(uc)
	if err != nil {
		uc.Close()
		return nil, &OpError{Op: "accept on " + l.path, Err: err}
	}
	c, err := newConn(uc, l.path, cred, l.lim)
	if err != nil {
		uc.Close()
		return nil, &OpError{Op: "accept on " + l.path, Err: err}
	}
	if !l.allows(cred) {
		perr := &PeerError{Cred: cred}
		// A new connection's buffer is empty: this cannot block for long.
		uc.SetWriteDeadline(time.Now().Add(time.Second))
		c.wmu.Lock()
		c.write(appendError(nil, CodeRefused, fmt.Sprintf("uid %d gid %d (pid %d) may not connect to %s", cred.UID, cred.GID, cred.PID, l.path)), nil)
		c.wmu.Unlock()
		c.Close()
		return nil, &OpError{Op: "accept on " + l.path, Err: perr}
	}
	c.wmu.Lock()
	err = c.write(appendHello(nil, c.lim), nil)
	c.wmu.Unlock()
	if err != nil {
		c.Close()
		return nil, &OpError{Op: "accept on " + l.path + ": send hello", Err: err}
	}
	return c, nil
}

func (l *Listener) allows(c Cred) bool {
	return c.UID == 0 || slices.Contains(l.uids, c.UID) || slices.Contains(l.gids, c.GID)
}

func peerCred(uc *net.UnixConn) (Cred, error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var uc2 *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) { uc2, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return Cred{}, err
	}
	if serr != nil {
		return Cred{}, os.NewSyscallError("getsockopt SO_PEERCRED", serr)
	}
	return Cred{PID: uc2.Pid, UID: uc2.Uid, GID: uc2.Gid}, nil
}

// Dial connects to the listener at path, reads its hello (or its refusal:
// an error matching ErrRefused) and sends this side's hello with lim, the
// limits of what this side accepts (zero fields take the defaults). ctx
// bounds the connect and the exchange of hellos, not the connection's life.
// Conn.Peer tells who listens, for callers that must check.
func Dial(ctx context.Context, path string, lim Limits) (*Conn, error) {
	c, err := dial(ctx, path, lim)
	if err != nil {
		return nil, &OpError{Op: "dial " + path, Err: err}
	}
	return c, nil
}

func dial(ctx context.Context, path string, lim Limits) (*Conn, error) {
	if strings.HasPrefix(path, "@") {
		return nil, fmt.Errorf("%w: abstract socket names are not used: give a file path", ErrInvalid)
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	uc := nc.(*net.UnixConn)
	cred, err := peerCred(uc)
	if err != nil {
		uc.Close()
		return nil, err
	}
	c, err := newConn(uc, path, cred, lim)
	if err != nil {
		uc.Close()
		return nil, err
	}
	// The context, not a copy of its deadline, cuts the handshake short, so
	// that a timeout is always reported as the context's error.
	stop := context.AfterFunc(ctx, func() { uc.SetDeadline(time.Unix(1, 0)) })
	err = c.handshake()
	if !stop() {
		err = fmt.Errorf("waiting for the listener's hello: %w", ctx.Err())
	}
	if err == nil {
		err = uc.SetDeadline(time.Time{})
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// handshake reads the listener's hello and sends ours.
func (c *Conn) handshake() error {
	c.rmu.Lock()
	f, fds, _, err := c.readFrame()
	if err == nil {
		switch f.kind {
		case KindHello:
			c.gotHello = true
			c.setPeerLimits(f.limits)
		case KindError:
			err = &RemoteError{Code: f.code, Message: f.msg}
		default:
			closeFDs(fds)
			err = fmt.Errorf("%w: a %s frame before the hello", ErrUnexpected, f.kind)
		}
	}
	c.rmu.Unlock()
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.write(appendHello(nil, c.lim), nil)
}
