<?php

defined('BASEPATH') or exit('No direct script access allowed');

use PerfexWebhooks\Module;

/** Setup → Webhooks pipeline: ingest URL, token, enabled events, spool size, test event. */
class Perfex_webhooks extends AdminController
{
    public function __construct()
    {
        parent::__construct();
        if (!is_admin()) {
            access_denied('perfex_webhooks');
        }
    }

    public function index()
    {
        $module = Module::instance();
        if ($this->input->post()) {
            $url = trim((string) $this->input->post('url'));
            if ($url !== '' && !preg_match('#^https?://#i', $url)) {
                set_alert('danger', 'The ingest URL must start with http:// or https://');
                redirect(admin_url('perfex_webhooks'));
            }
            update_option('perfex_webhooks_url', $url);
            $token = trim((string) $this->input->post('token'));
            if ($token !== '') { // an empty field keeps the stored token (it is never shown)
                update_option('perfex_webhooks_token', $token);
            }
            $events = array_values(array_intersect(
                (array) $this->input->post('events'),
                array_keys($module->map()['events'])
            ));
            update_option('perfex_webhooks_events', json_encode($events));
            update_option('perfex_webhooks_timeout_ms', (string) max(200, min(10000, (int) $this->input->post('timeout_ms'))));
            $module->reset();
            set_alert('success', 'Settings saved');
            redirect(admin_url('perfex_webhooks'));
        }
        $spool = $module->spool();
        $data = [
            'title' => 'Webhooks pipeline',
            'map' => $module->map(),
            'url' => get_option('perfex_webhooks_url'),
            'has_token' => get_option('perfex_webhooks_token') !== '',
            'timeout_ms' => get_option('perfex_webhooks_timeout_ms') ?: '3000',
            'module' => $module,
            'spool_size' => $spool->size(),
            'paused_until' => $spool->pausedUntil(),
            'last_error' => $spool->lastError(),
        ];
        $this->load->view('settings', $data);
    }

    public function test_event()
    {
        if (!$this->input->post()) {
            redirect(admin_url('perfex_webhooks'));
        }
        $result = Module::instance()->sendTest((string) $this->input->post('event'));
        if ($result['ok']) {
            set_alert('success', 'The pipeline accepted the test event ' . $result['id'] . ' (key ' . $result['key'] . ')');
        } else {
            set_alert('danger', 'Test event not accepted: ' . $result['error']);
        }
        redirect(admin_url('perfex_webhooks'));
    }

    public function flush()
    {
        if ($this->input->post()) {
            $stats = Module::instance()->outbox()->flush(10.0);
            set_alert(
                $stats['error'] === null ? 'success' : 'warning',
                "Sent {$stats['sent']}, refused {$stats['refused']}, {$stats['left']} left in the spool"
                . ($stats['error'] !== null ? ': ' . $stats['error'] : '')
            );
        }
        redirect(admin_url('perfex_webhooks'));
    }
}
