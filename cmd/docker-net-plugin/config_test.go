package main

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// TestSettingsDocumented: every setting a user can change on the managed
// plugin (config.json's settable environment variables and mount sources)
// is in the settings table of docs/install.md.
func TestSettingsDocumented(t *testing.T) {
	raw, err := os.ReadFile("../../config.json")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Env []struct {
			Name     string   `json:"name"`
			Settable []string `json:"settable"`
		} `json:"env"`
		Mounts []struct {
			Name     string   `json:"name"`
			Settable []string `json:"settable"`
		} `json:"mounts"`
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("config.json: %v", err)
	}
	doc, err := os.ReadFile("../../docs/install.md")
	if err != nil {
		t.Fatal(err)
	}
	var settings []string
	for _, e := range cfg.Env {
		if len(e.Settable) > 0 {
			settings = append(settings, e.Name)
		}
	}
	for _, m := range cfg.Mounts {
		if len(m.Settable) > 0 {
			settings = append(settings, m.Name+".source")
		}
	}
	if len(settings) == 0 {
		t.Fatal("config.json has no settable setting")
	}
	for _, s := range settings {
		if !strings.Contains(string(doc), "`"+s+"`") {
			t.Errorf("setting %s is not in docs/install.md's settings table", s)
		}
	}
}
