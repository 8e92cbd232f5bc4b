package zk

import "time"

// SetSessionTimeout changes the main session timeout of stores opened
// afterwards, so tests can make a session expire quickly; it returns a
// function that restores the default.
func SetSessionTimeout(d time.Duration) (restore func()) {
	old := sessionTimeout
	sessionTimeout = d
	return func() { sessionTimeout = old }
}
